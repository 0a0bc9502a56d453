//! MMIO exits to the VMM, with their data both ways: what an access the
//! daemon answered with `EXIT_TO_VMM` asks the VMM to emulate (KVM's
//! `kvm_run.mmio`, filled by `io_mem_abort()`), and how the VMM's answer to
//! a read lands in the guest's register (KVM's `kvm_handle_mmio_return()`).
//!
//! The exit is an [`MmioExit`] record in memory the core shares with its
//! VMM (`docs/ring-abi.md`, "Exits to the VMM"). A write carries its value;
//! for a read the VMM puts the value in `data` and the core completes the
//! load with [`AccessSyndrome::load_result`]. An access without a valid
//! syndrome (ISV clear) cannot be emulated and never becomes a record.

use crate::abort::{Abort, Access, AccessSyndrome};
use crate::addr::Ipa;

/// One MMIO access for the VMM: 24 bytes, little-endian, in memory the
/// core and the VMM share.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[repr(C)]
pub struct MmioExit {
    /// The IPA accessed.
    pub ipa: u64,
    /// A write: the value stored, its low `len` bytes. A read: zero from
    /// the core; the VMM writes the value read here before it resumes the
    /// vCPU.
    pub data: u64,
    /// Bytes accessed: 1, 2, 4 or 8.
    pub len: u32,
    /// 1 for a write, 0 for a read.
    pub is_write: u32,
}

/// Size of [`MmioExit`] in shared memory.
pub const MMIO_EXIT_SIZE: usize = 24;

const _: () = {
    assert!(core::mem::size_of::<MmioExit>() == MMIO_EXIT_SIZE);
    assert!(core::mem::offset_of!(MmioExit, ipa) == 0);
    assert!(core::mem::offset_of!(MmioExit, data) == 8);
    assert!(core::mem::offset_of!(MmioExit, len) == 16);
    assert!(core::mem::offset_of!(MmioExit, is_write) == 20);
};

impl MmioExit {
    /// The exit for `abort` at `ipa`, with the value a write stores taken
    /// from the guest's general registers (`x[31]` reads as XZR, zero).
    /// `None` if the abort carries no valid syndrome: nothing to emulate
    /// with (KVM_RUN fails with ENOSYS there).
    pub fn new(abort: &Abort, ipa: Ipa, x: &[u64; 31]) -> Option<Self> {
        let syndrome = abort.syndrome?;
        let write = abort.access == Access::Write;
        let data = match write {
            true => syndrome.store_value(x.get(usize::from(syndrome.register)).copied().unwrap_or(0)),
            false => 0,
        };
        Some(Self { ipa: ipa.raw(), data, len: u32::from(syndrome.size), is_write: u32::from(write) })
    }

    /// The record as the shared memory holds it.
    pub fn encode(&self) -> [u64; 3] {
        [self.ipa, self.data, u64::from(self.len) | u64::from(self.is_write) << 32]
    }

    /// A record read from shared memory (once: a peer may rewrite it).
    pub fn decode(words: [u64; 3]) -> Self {
        Self { ipa: words[0], data: words[1], len: words[2] as u32, is_write: (words[2] >> 32) as u32 }
    }
}

impl AccessSyndrome {
    /// Bits of an access of this size.
    fn mask(&self) -> u64 {
        match self.size {
            8.. => u64::MAX,
            n => (1u64 << (8 * u32::from(n))) - 1,
        }
    }

    /// What a store of register value `reg` writes: its low `size` bytes.
    pub fn store_value(&self, reg: u64) -> u64 {
        reg & self.mask()
    }

    /// What a load leaves in its register when the VMM read `data`: the low
    /// `size` bytes, sign-extended if SSE, cut to 32 bits for a W register
    /// (SF clear), as `kvm_handle_mmio_return()` does. `None` for XZR: the
    /// value goes nowhere.
    pub fn load_result(&self, data: u64) -> Option<(usize, u64)> {
        let bits = 8 * u32::from(self.size.min(8));
        let mut value = data & self.mask();
        if self.sign_extend && bits < 64 {
            let shift = 64 - bits;
            value = (((value << shift) as i64) >> shift) as u64;
        }
        if !self.sixty_four {
            value &= u64::from(u32::MAX);
        }
        (self.register < 31).then_some((usize::from(self.register), value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DABT: u64 = 0x24 << 26 | 1 << 25;
    const ISV: u64 = 1 << 24;
    const WNR: u64 = 1 << 6;
    const SF: u64 = 1 << 15;
    const SSE: u64 = 1 << 21;

    fn abort(esr: u64) -> Abort {
        // HPFAR.FIPA (bits 43:4) holds IPA bits 51:12: page 0x9000_0000.
        Abort::decode(esr, 0x1008, (0x9000_0000 >> 12) << 4).unwrap()
    }

    fn x(reg: usize, value: u64) -> [u64; 31] {
        let mut x = [0; 31];
        x[reg] = value;
        x
    }

    #[test]
    fn a_write_carries_the_low_bytes_of_its_register() {
        // STR X5 (64-bit), STRH W7, STR XZR.
        let ipa = Ipa::new(0x9000_0008);
        let str64 = abort(DABT | ISV | 3 << 22 | 5 << 16 | SF | WNR | 0b000111);
        let exit = MmioExit::new(&str64, ipa, &x(5, 0x1122_3344_5566_7788)).unwrap();
        assert_eq!(exit, MmioExit { ipa: 0x9000_0008, data: 0x1122_3344_5566_7788, len: 8, is_write: 1 });
        let strh = abort(DABT | ISV | 1 << 22 | 7 << 16 | WNR | 0b000111);
        assert_eq!(MmioExit::new(&strh, ipa, &x(7, 0xffff_abcd)).unwrap().data, 0xabcd);
        let xzr = abort(DABT | ISV | 3 << 22 | 31 << 16 | SF | WNR | 0b000111);
        assert_eq!(MmioExit::new(&xzr, ipa, &[u64::MAX; 31]).unwrap().data, 0);
        // A read asks; nothing to carry yet.
        let ldr = abort(DABT | ISV | 3 << 22 | 3 << 16 | SF | 0b000111);
        assert_eq!(
            MmioExit::new(&ldr, ipa, &x(3, 77)).unwrap(),
            MmioExit { ipa: ipa.raw(), data: 0, len: 8, is_write: 0 }
        );
        // No syndrome, no exit record.
        assert_eq!(MmioExit::new(&abort(DABT | WNR | 0b000111), ipa, &[0; 31]), None);
    }

    #[test]
    fn a_read_lands_sized_sign_extended_and_cut_to_its_register() {
        let s = |size: u8, sign_extend: bool, sixty_four: bool, register: u8| AccessSyndrome {
            size,
            sign_extend,
            register,
            sixty_four,
            acquire_release: false,
        };
        assert_eq!(s(8, false, true, 3).load_result(0x8877_6655_4433_2211), Some((3, 0x8877_6655_4433_2211)));
        // LDRB W1: one byte, zero-extended.
        assert_eq!(s(1, false, false, 1).load_result(0x1ff), Some((1, 0xff)));
        // LDRSH X2: sign-extended to 64 bits; LDRSH W2: then cut to 32.
        assert_eq!(s(2, true, true, 2).load_result(0x8001), Some((2, 0xffff_ffff_ffff_8001)));
        assert_eq!(s(2, true, false, 2).load_result(0x8001), Some((2, 0xffff_8001)));
        // LDRSW X4: a positive word stays as it is.
        assert_eq!(s(4, true, true, 4).load_result(0xdead_0000_7fff_ffff), Some((4, 0x7fff_ffff)));
        // LDR XZR: nowhere to put it.
        assert_eq!(s(8, false, true, 31).load_result(5), None);
        // Decoded from a syndrome: LDRSB X9.
        let a = abort(DABT | ISV | SSE | 9 << 16 | SF | 0b000111);
        assert_eq!(a.syndrome.unwrap().load_result(0x80), Some((9, 0xffff_ffff_ffff_ff80)));
    }

    #[test]
    fn the_record_round_trips_through_shared_memory_words() {
        let e = MmioExit { ipa: 0xa000_0000, data: 0x55, len: 4, is_write: 1 };
        assert_eq!(MmioExit::decode(e.encode()), e);
        assert_eq!(e.encode()[2], 4 | 1 << 32);
    }
}
