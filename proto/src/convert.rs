//! The wire form of the values every Faultline service shares: times, and
//! hyp-core's architectural vocabulary (accesses, mapping sizes). Defined
//! once here, beside the generated types, for the daemon's API and its
//! policy client alike.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyp_core::abort::Access;
use hyp_core::stage2::MapSize;

use crate::v1 as pb;

/// The wire form of a time (before 1970: the epoch).
pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

/// The time a wire timestamp names, or `None` if it is before 1970 or its
/// nanoseconds are out of range.
pub fn system_time(t: &prost_types::Timestamp) -> Option<SystemTime> {
    let seconds = u64::try_from(t.seconds).ok()?;
    let nanos = u32::try_from(t.nanos).ok().filter(|&n| n < 1_000_000_000)?;
    Some(UNIX_EPOCH + Duration::new(seconds, nanos))
}

/// The wire form of an access (`None`: unspecified).
pub fn access(a: Option<Access>) -> pb::Access {
    match a {
        None => pb::Access::Unspecified,
        Some(Access::Read) => pb::Access::Read,
        Some(Access::Write) => pb::Access::Write,
        Some(Access::Execute) => pb::Access::Execute,
    }
}

/// The wire form of a mapping size (`None`: no mapping).
pub fn mapping_size(s: Option<MapSize>) -> pb::MappingSize {
    match s {
        None => pb::MappingSize::Unspecified,
        Some(MapSize::Page4K) => pb::MappingSize::MappingSize4k,
        Some(MapSize::Block2M) => pb::MappingSize::MappingSize2m,
        Some(MapSize::Block1G) => pb::MappingSize::MappingSize1g,
    }
}

/// The mapping size a wire value names: `Ok(None)` for unspecified,
/// `Err(value)` for a value this build does not know.
pub fn map_size(value: i32) -> Result<Option<MapSize>, i32> {
    match pb::MappingSize::try_from(value) {
        Ok(pb::MappingSize::Unspecified) => Ok(None),
        Ok(pb::MappingSize::MappingSize4k) => Ok(Some(MapSize::Page4K)),
        Ok(pb::MappingSize::MappingSize2m) => Ok(Some(MapSize::Block2M)),
        Ok(pb::MappingSize::MappingSize1g) => Ok(Some(MapSize::Block1G)),
        Err(_) => Err(value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_and_bad_ones_are_refused() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        assert_eq!(system_time(&timestamp(t)), Some(t));
        assert_eq!(system_time(&prost_types::Timestamp { seconds: -1, nanos: 0 }), None);
        assert_eq!(system_time(&prost_types::Timestamp { seconds: 1, nanos: 1_000_000_000 }), None);
    }

    #[test]
    fn sizes_and_accesses_round_trip() {
        for s in [None, Some(MapSize::Page4K), Some(MapSize::Block2M), Some(MapSize::Block1G)] {
            assert_eq!(map_size(mapping_size(s) as i32), Ok(s));
        }
        assert_eq!(map_size(9), Err(9));
        assert_eq!(access(Some(Access::Write)), pb::Access::Write);
        assert_eq!(access(None), pb::Access::Unspecified);
    }
}
