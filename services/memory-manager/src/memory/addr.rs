//! The daemon's own virtual addresses.

hyp_core::address_type!(
    /// Host virtual address: where the daemon mapped a region. Never mixed
    /// with hyp-core's `Ipa` (guest physical) or `Pa` (host physical).
    Hva,
    "Hva"
);
