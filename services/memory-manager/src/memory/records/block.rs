//! One 2 MiB block of IPA's records: where each starts in the block and
//! its size, sorted by IPA, and beside them, while they are kept, their
//! install orders.

use hyp_core::stage2::MapSize;

/// Where a record starts in its block and its size, in 16 bits: its 4 KiB
/// page in the block (the low 9 bits) and its size ([`MapSize::ALL`]'s
/// index, the top 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Place(u16);

impl Place {
    const SIZE_SHIFT: u32 = 14;

    /// Pages a block may hold: the bits below the size.
    pub const PAGES: u32 = 1 << Self::SIZE_SHIFT;

    /// A record of `size` at `page` of its block (below [`Self::PAGES`]).
    pub fn new(page: u16, size: MapSize) -> Self {
        debug_assert!(u32::from(page) < Self::PAGES);
        let size_index = MapSize::ALL.iter().position(|&s| s == size).expect("every size is listed") as u16;
        Self(page | size_index << Self::SIZE_SHIFT)
    }

    /// The page of the block it starts at.
    pub fn page(self) -> u16 {
        self.0 & ((1 << Self::SIZE_SHIFT) - 1)
    }

    /// Its size.
    pub fn size(self) -> MapSize {
        MapSize::ALL[usize::from(self.0 >> Self::SIZE_SHIFT)]
    }
}

/// A block's records: places sorted by page, none twice, and either an
/// install order for each (an offset from the table's base) or none.
#[derive(Debug)]
pub struct Block {
    places: Vec<Place>,
    /// Empty while orders are not kept, else one a place.
    orders: Vec<u32>,
}

impl Block {
    /// No records yet, with room for one: a 2 MiB or 1 GiB mapping is alone
    /// in its block.
    pub fn new() -> Self {
        Self { places: Vec::with_capacity(1), orders: Vec::new() }
    }

    /// Records.
    pub fn len(&self) -> usize {
        self.places.len()
    }

    /// True if it holds none.
    pub fn is_empty(&self) -> bool {
        self.places.is_empty()
    }

    /// The place and order (if kept) of record `i`.
    pub fn get(&self, i: usize) -> (Place, Option<u32>) {
        (self.places[i], self.orders.get(i).copied())
    }

    /// The index of the record at `page`, or where it would go.
    pub fn find(&self, page: u16) -> Result<usize, usize> {
        self.places.binary_search_by_key(&page, |p| p.page())
    }

    /// The number of records, from the first, whose place `below` holds for.
    pub fn partition_point(&self, below: impl Fn(Place) -> bool) -> usize {
        self.places.partition_point(|&p| below(p))
    }

    /// The last record's place.
    pub fn last(&self) -> Option<Place> {
        self.places.last().copied()
    }

    /// Puts a record at index `i` (from [`Self::find`]), with its order if
    /// orders are kept.
    pub fn insert(&mut self, i: usize, place: Place, order: Option<u32>) {
        self.places.insert(i, place);
        if let Some(order) = order {
            // As much room as the places: a block mapping's one order takes
            // one slot, not a vector's first four.
            let room = self.places.capacity();
            if self.orders.capacity() < room {
                self.orders.reserve_exact(room - self.orders.len());
            }
            self.orders.insert(i, order);
        }
        self.check();
    }

    /// Replaces record `i`; returns what it was.
    pub fn replace(&mut self, i: usize, place: Place, order: Option<u32>) -> (Place, Option<u32>) {
        let old = self.get(i);
        self.places[i] = place;
        if let Some(order) = order {
            self.orders[i] = order;
        }
        self.check();
        old
    }

    /// Removes record `i`; returns it. A block left at a quarter of its
    /// room gives half of it back.
    pub fn remove(&mut self, i: usize) -> (Place, Option<u32>) {
        let place = self.places.remove(i);
        let order = (!self.orders.is_empty()).then(|| self.orders.remove(i));
        if self.places.len() * 4 < self.places.capacity() {
            self.places.shrink_to(self.places.len() * 2);
            self.orders.shrink_to(self.orders.len() * 2);
        }
        (place, order)
    }

    /// Starts keeping orders, each record's at offset 0 (the table's base:
    /// the oldest), or stops (they go).
    pub fn keep_orders(&mut self, keep: bool) {
        self.orders = if keep { vec![0; self.places.len()] } else { Vec::new() };
    }

    /// The orders kept (none if not kept).
    pub fn orders_mut(&mut self) -> &mut [u32] {
        &mut self.orders
    }

    /// The places and orders, in order.
    pub fn into_records(self) -> impl Iterator<Item = (Place, Option<u32>)> {
        let mut orders = self.orders.into_iter();
        self.places.into_iter().map(move |p| (p, orders.next()))
    }

    /// Bytes of memory its records take (its vectors' room).
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.places.capacity() * std::mem::size_of::<Place>() + self.orders.capacity() * std::mem::size_of::<u32>()
    }

    fn check(&self) {
        debug_assert!(
            self.orders.is_empty() || self.orders.len() == self.places.len(),
            "an order for each record, or none"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_place_keeps_every_size_and_page_apart() {
        for size in MapSize::ALL {
            for page in [0, 1, 255, 511] {
                let place = Place::new(page, size);
                assert_eq!((place.page(), place.size()), (page, size));
            }
        }
    }

    #[test]
    fn orders_go_and_come_back_as_the_oldest_beside_their_records() {
        let mut b = Block::new();
        for (i, page) in [3u16, 1, 2].into_iter().enumerate() {
            let at = b.find(page).unwrap_err();
            b.insert(at, Place::new(page, MapSize::Page4K), Some(10 + i as u32));
        }
        assert_eq!((b.get(0).1, b.get(1).1, b.get(2).1), (Some(11), Some(12), Some(10)));
        b.keep_orders(false);
        assert_eq!(b.get(1), (Place::new(2, MapSize::Page4K), None));
        let at = b.find(0).unwrap_err();
        b.insert(at, Place::new(0, MapSize::Page4K), None);
        assert_eq!(b.remove(2), (Place::new(2, MapSize::Page4K), None));
        b.keep_orders(true);
        let at = b.find(7).unwrap_err();
        b.insert(at, Place::new(7, MapSize::Page4K), Some(9));
        let all: Vec<(u16, Option<u32>)> = b.into_records().map(|(p, o)| (p.page(), o)).collect();
        assert_eq!(all, [(0, Some(0)), (1, Some(0)), (3, Some(0)), (7, Some(9))]);
    }
}
