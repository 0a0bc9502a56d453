//! hyp-core's command validation against random command sequences from a
//! hostile daemon, with faults taken between them. After every step:
//! - every installed leaf maps memory the VM owns (inside what was donated
//!   to it), at a PA aligned to the leaf's size, with permissions no wider
//!   than some accepted command asked for at that IPA;
//! - the hypervisor owns exactly the root, the table pages and the
//!   memcache;
//! - a refused command changed nothing (a stale-sequence MAP only ends its
//!   fault, KVM's -EAGAIN).
#![no_main]

use std::sync::atomic::{AtomicU64, Ordering};

use arbitrary::Arbitrary;
use hyp_core::abort::Access;
use hyp_core::addr::{Ipa, Pa, PAGE_SIZE};
use hyp_core::ownership::{Owner, PageOwnership, VmId};
use hyp_core::reject::Reject;
use hyp_core::ring::abi::{kind, CommandRecord, FLAG_DEVICE};
use hyp_core::ring::{Consumer, OwnedRing, Producer};
use hyp_core::stage2::{Descriptor, Geometry, Perms, Walk};
use hyp_core::testing::{CoreSnapshot, HostMemory, NoTlb};
use hyp_core::vm::Vm;
use libfuzzer_sys::fuzz_target;

const OWN_BASE: u64 = 0x4000_0000;
/// 8 MiB donated to the VM under test (kept small: every step counts the
/// owner of each page tracked).
const VM_MEM: u64 = 0x4000_0000;
const VM_MEM_LEN: u64 = 8 << 20;
/// 2 MiB donated to another VM.
const OTHER_MEM: u64 = 0x4080_0000;
/// 2 MiB never donated.
const HOST_MEM: u64 = 0x40a0_0000;
const TABLES: u64 = 0x40c0_0000;
const TABLE_PAGES: usize = 96;
const GUEST_BASE: u64 = 0x8000_0000;

/// A hostile choice, made about one time in eight; otherwise `None`, the
/// well-formed default, so that long valid sequences (fault, map, fault
/// on the leaf, relax) come up often.
#[derive(Debug, Clone, Copy)]
struct Rare<T>(Option<T>);

impl<'a, T: Arbitrary<'a>> Arbitrary<'a> for Rare<T> {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(Self(if u8::arbitrary(u)? >= 224 { Some(T::arbitrary(u)?) } else { None }))
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum IpaSel {
    Page(u16),
    Block(u8),
    Raw(u64),
}

impl IpaSel {
    fn get(self) -> u64 {
        match self {
            Self::Page(n) => GUEST_BASE + u64::from(n % 8192) * PAGE_SIZE,
            Self::Block(n) => GUEST_BASE + u64::from(n % 16) * (2 << 20),
            Self::Raw(v) => v,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum PaSel {
    Mine(u16),
    MineBlock(u8),
    Other(u16),
    Host(u16),
    Table(u8),
    Raw(u64),
}

impl PaSel {
    fn get(self) -> u64 {
        match self {
            Self::Mine(n) => VM_MEM + u64::from(n % 2048) * PAGE_SIZE,
            Self::MineBlock(n) => VM_MEM + u64::from(n % 4) * (2 << 20),
            Self::Other(n) => OTHER_MEM + u64::from(n % 512) * PAGE_SIZE,
            Self::Host(n) => HOST_MEM + u64::from(n % 512) * PAGE_SIZE,
            Self::Table(n) => TABLES + u64::from(n) * PAGE_SIZE,
            Self::Raw(v) => v,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum SizeSel {
    Page,
    Pages(u8),
    Block,
    Gib,
    Raw(u64),
}

impl SizeSel {
    fn get(self) -> u64 {
        match self {
            Self::Page => PAGE_SIZE,
            Self::Pages(n) => u64::from(n) * PAGE_SIZE,
            Self::Block => 2 << 20,
            Self::Gib => 1 << 30,
            Self::Raw(v) => v,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum FaultKind {
    /// What a guest meets next at the IPA: a permission fault for the first
    /// of write and exec the leaf lacks, else a read translation fault.
    Next,
    ReadTranslation,
    WriteTranslation,
    ExecTranslation,
    WritePermission,
    ExecPermission,
    /// A read that finds its leaf's access flag clear (after an AGE).
    ReadAccessFlag,
    Raw(u64),
}

/// One step: a fault, or a command shaped like a daemon's (the vCPU's
/// outstanding fault, the current sequence, zero where the kind wants
/// zero) so that deep checks are reached, with hostile addresses, sizes
/// and permissions; or a raw one.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Op {
    /// By default a fault on the first vCPU without one.
    Fault {
        /// Another vCPU.
        vcpu: Rare<u8>,
        /// Anywhere, rather than on the highest installed leaf.
        ipa: Rare<IpaSel>,
        kind: Rare<FaultKind>,
    },
    /// By default a valid MAP: the first waiting vCPU's fault, at its IPA,
    /// with the permissions its access needs.
    Map {
        /// Another vCPU than the first one waiting.
        vcpu: Rare<u8>,
        /// Another IPA than the fault's (aligned down to the size).
        ipa: Rare<IpaSel>,
        /// Another PA than the one mapped at the IPA (a relax) or, with
        /// nothing mapped, than the VM's first page.
        pa: Rare<PaSel>,
        size: SizeSel,
        /// Other permissions (and device memory) than the access needs.
        perms: Rare<u8>,
    },
    Prefault {
        ipa: IpaSel,
        pa: PaSel,
        size: SizeSel,
        perms: u8,
    },
    Unmap {
        ipa: IpaSel,
        size: SizeSel,
    },
    WriteProtect {
        ipa: IpaSel,
        size: SizeSel,
    },
    Complete {
        vcpu: u8,
        action: u8,
    },
    Topup {
        pa: PaSel,
        size: SizeSel,
    },
    Owned {
        pa: PaSel,
        size: SizeSel,
    },
    Leaves {
        ipa: IpaSel,
        size: SizeSel,
    },
    Age {
        ipa: IpaSel,
        size: SizeSel,
    },
    /// Every field as the fuzzer likes.
    Raw {
        vcpu: u8,
        kind: u8,
        flags: u32,
        fault_id: u64,
        ipa: IpaSel,
        pa: PaSel,
        size: SizeSel,
        inval_seq: u64,
        reserved: u64,
    },
}

const KINDS: [u32; 10] = [
    kind::AGE,
    kind::MAP,
    kind::UNMAP,
    kind::WRITE_PROTECT,
    kind::COMPLETE,
    kind::TOPUP,
    kind::PREFAULT,
    kind::LEAVES,
    kind::OWNED,
    kind::FAULT,
];

/// Permission bits (R, W, X) and, with bit 3, device memory.
fn perm_flags(perms: u8) -> u32 {
    u32::from(perms & 7) | if perms & 8 != 0 { FLAG_DEVICE } else { 0 }
}

/// The command `op` stands for, on which vCPU's ring (`None` for a fault).
fn command(op: Op, vm: &Vm<&HostMemory>) -> Option<(u32, CommandRecord)> {
    let blank = CommandRecord { cmd_id: 1, ..Default::default() };
    let range = |kind, ipa: IpaSel, size: SizeSel| CommandRecord { kind, ipa: ipa.get(), size: size.get(), ..blank };
    Some(match op {
        Op::Fault { .. } => return None,
        Op::Map { vcpu, ipa, pa, size, perms } => {
            let (vcpu, ipa, pa, perms) = (vcpu.0, ipa.0, pa.0, perms.0);
            let waiting = (0..vm.nr_vcpus()).find(|&v| vm.outstanding(v).is_some());
            let vcpu = vcpu.map_or(waiting.unwrap_or(0), |v| u32::from(v % 5));
            let fault = vm.outstanding(vcpu);
            let size = size.get();
            let ipa = match (ipa, fault.and_then(|f| f.ipa)) {
                (None, Some(f)) if size.is_power_of_two() => f.raw() & !(size - 1),
                (None, _) => GUEST_BASE,
                (Some(ipa), _) => ipa.get(),
            };
            let pa = match (pa, vm.stage2().walk(Ipa::new(ipa))) {
                (Some(pa), _) => pa.get(),
                (None, Ok(Walk::Mapped { descriptor, .. })) => descriptor.output().raw(),
                (None, _) => VM_MEM,
            };
            let needed = match fault.map(|f| f.access) {
                Some(Access::Write) => Perms::RW,
                Some(Access::Execute) => Perms::RX,
                _ => Perms::R,
            };
            let cmd = CommandRecord {
                kind: kind::MAP,
                flags: perms.map_or(needed.bits(), perm_flags),
                fault_id: fault.map_or(0, |f| f.fault_id),
                ipa,
                pa,
                size,
                inval_seq: vm.inval_seq(),
                ..blank
            };
            (vcpu, cmd)
        }
        Op::Prefault { ipa, pa, size, perms } => {
            let cmd = CommandRecord {
                kind: kind::PREFAULT,
                flags: perm_flags(perms),
                ipa: ipa.get(),
                pa: pa.get(),
                size: size.get(),
                inval_seq: vm.inval_seq(),
                ..blank
            };
            (0, cmd)
        }
        Op::Unmap { ipa, size } => (0, range(kind::UNMAP, ipa, size)),
        Op::WriteProtect { ipa, size } => (0, range(kind::WRITE_PROTECT, ipa, size)),
        Op::Leaves { ipa, size } => (0, range(kind::LEAVES, ipa, size)),
        Op::Age { ipa, size } => (0, range(kind::AGE, ipa, size)),
        Op::Complete { vcpu, action } => {
            let waiting = (0..vm.nr_vcpus()).find(|&v| vm.outstanding(v).is_some());
            let vcpu = waiting.unwrap_or(u32::from(vcpu % 5));
            let fault_id = vm.outstanding(vcpu).map_or(0, |f| f.fault_id);
            (vcpu, CommandRecord { kind: kind::COMPLETE, flags: u32::from(action % 4), fault_id, ..blank })
        }
        Op::Topup { pa, size } => (0, CommandRecord { kind: kind::TOPUP, pa: pa.get(), size: size.get(), ..blank }),
        Op::Owned { pa, size } => (0, CommandRecord { kind: kind::OWNED, pa: pa.get(), size: size.get(), ..blank }),
        Op::Raw { vcpu, kind, flags, fault_id, ipa, pa, size, inval_seq, reserved } => {
            let cmd = CommandRecord {
                kind: KINDS[kind as usize % KINDS.len()],
                flags,
                fault_id,
                ipa: ipa.get(),
                pa: pa.get(),
                size: size.get(),
                inval_seq,
                reserved,
                ..blank
            };
            (u32::from(vcpu % 5), cmd)
        }
    })
}

fn esr(kind: FaultKind) -> u64 {
    const DABT: u64 = 0x24 << 26;
    const IABT: u64 = 0x20 << 26;
    const IL: u64 = 1 << 25;
    const WNR: u64 = 1 << 6;
    match kind {
        FaultKind::ReadTranslation => DABT | IL | 0b000111,
        FaultKind::WriteTranslation => DABT | IL | WNR | 0b000111,
        FaultKind::ExecTranslation => IABT | IL | 0b000111,
        FaultKind::WritePermission => DABT | IL | WNR | 0b001111,
        FaultKind::ExecPermission => IABT | IL | 0b001111,
        FaultKind::ReadAccessFlag => DABT | IL | 0b001011,
        FaultKind::Raw(v) => v,
        FaultKind::Next => unreachable!("resolved before"),
    }
}

/// Commands executed, reported every 100,000 (scripts/fuzz.sh reports the last count).
static COMMANDS: AtomicU64 = AtomicU64::new(0);

fn leaf_bytes(level: u8) -> u64 {
    1 << (12 + 9 * (3 - u32::from(level)))
}

fuzz_target!(|input: (bool, Vec<Op>)| {
    let (wide_ipa, ops) = input;
    let me = VmId::new(1).unwrap();
    let mem = HostMemory::new(Pa::new(TABLES), TABLE_PAGES);
    let mut storage = vec![0u16; ((TABLES - OWN_BASE) / PAGE_SIZE) as usize + TABLE_PAGES];
    let mut owners = PageOwnership::new(Pa::new(OWN_BASE), &mut storage);
    owners.transfer(Pa::new(VM_MEM), VM_MEM_LEN, Owner::Host, Owner::Vm(me)).unwrap();
    owners.transfer(Pa::new(OTHER_MEM), 2 << 20, Owner::Host, Owner::Vm(VmId::new(2).unwrap())).unwrap();
    let geometry = if wide_ipa { Geometry::new(48, 48).unwrap() } else { Geometry::kvm_default() };
    let mut vm = Vm::new(me, geometry, Pa::new(TABLES), 4, &mem, &mut owners).unwrap();
    let root_pages = geometry.root_size() / PAGE_SIZE;
    // A memcache to start with, as the daemon tops up at attach; the rest
    // of the table memory is left for the fuzzer's own TOPUPs.
    let first = TABLES + geometry.root_size();
    let topup = CommandRecord { kind: kind::TOPUP, pa: first, size: 16 * PAGE_SIZE, ..Default::default() };
    assert_eq!(vm.execute(0, &topup.encode(), &mut owners, &mut NoTlb).result.status, 0);
    // Permissions accepted commands asked for: (IPA range, perms).
    let mut granted: Vec<(u64, u64, Perms)> = Vec::new();
    // The control ring's results, for LEAVES.
    let control_results = OwnedRing::new();
    let mut results = Producer::attach(control_results.view()).unwrap();
    let mut drained = Consumer::attach(control_results.view()).unwrap();
    let mut before = CoreSnapshot::of(&vm, &owners);
    for op in ops {
        match op {
            Op::Fault { vcpu, ipa, kind } => {
                let (vcpu, ipa, kind) = (vcpu.0, ipa.0, kind.0.unwrap_or(FaultKind::Next));
                let idle = (0..vm.nr_vcpus()).find(|&v| vm.outstanding(v).is_none());
                let vcpu = vcpu.map_or(idle.unwrap_or(0), |v| u32::from(v % 5));
                // A fault on an installed leaf (a permission fault's
                // usual place), or anywhere. FAR is the IPA: the stage-1
                // walk that finds it when HPFAR is not written (permission
                // faults) is the identity here.
                let highest = before.leaves.last().map(|&(ipa, _, _)| ipa);
                let ipa = ipa.map_or(highest.unwrap_or(GUEST_BASE), IpaSel::get);
                let kind = match (kind, vm.stage2().walk(Ipa::new(ipa))) {
                    (FaultKind::Next, Ok(Walk::Mapped { descriptor, .. })) if !descriptor.perms().write() => {
                        FaultKind::WritePermission
                    }
                    (FaultKind::Next, Ok(Walk::Mapped { descriptor, .. })) if !descriptor.perms().exec() => {
                        FaultKind::ExecPermission
                    }
                    (FaultKind::Next, _) => FaultKind::ReadTranslation,
                    (kind, _) => kind,
                };
                // As the machines do: an access-flag fault on a mapped leaf
                // stays at the core.
                let _ = vm.handle_abort(vcpu, esr(kind), ipa, (ipa >> 12) << 4, 0, |far| Some(Ipa::new(far)));
            }
            op => {
                let (vcpu, cmd) = command(op, &vm).expect("a command");
                if COMMANDS.fetch_add(1, Ordering::Relaxed) % 100_000 == 99_999 {
                    eprintln!("core_commands: {} commands executed", COMMANDS.load(Ordering::Relaxed));
                }
                let executed = if cmd.kind == kind::LEAVES {
                    let e = vm.execute_control(vcpu, &cmd.encode(), &mut owners, &mut NoTlb, &mut results).unwrap();
                    while drained.pop().unwrap().is_some() {}
                    e
                } else {
                    vm.execute(vcpu, &cmd.encode(), &mut owners, &mut NoTlb)
                };
                match executed.rejected() {
                    None => {
                        if matches!(cmd.kind, kind::MAP | kind::PREFAULT) {
                            let perms = Perms::from_bits(cmd.flags & !FLAG_DEVICE).unwrap();
                            granted.push((cmd.ipa, cmd.ipa.saturating_add(cmd.size), perms));
                        }
                    }
                    Some(reason) => {
                        let mut after = CoreSnapshot::of(&vm, &owners);
                        if reason == Reject::StaleSequence && executed.completion.is_some() {
                            // The fault ends (the guest retries), nothing else.
                            assert_eq!(before.outstanding[vcpu as usize].map(|o| o.fault_id), Some(cmd.fault_id));
                            assert_eq!(after.outstanding[vcpu as usize], None);
                            after.outstanding[vcpu as usize] = before.outstanding[vcpu as usize];
                        }
                        assert_eq!(before, after, "{cmd:?} was refused ({reason:?}) but changed the state");
                    }
                }
            }
        }
        // The invariants, after every step.
        let now = CoreSnapshot::of(&vm, &owners);
        before = now;
        let now = &before;
        assert_eq!(
            now.hyp_pages as u64,
            root_pages + now.table_pages + now.memcache as u64,
            "the hypervisor owns pages that are neither root, tables nor memcache"
        );
        for &(ipa, level, raw) in &now.leaves {
            let d = Descriptor::from_raw(raw);
            let bytes = leaf_bytes(level);
            let pa = d.output().raw();
            assert_eq!(pa % bytes, 0, "leaf at {ipa:#x} maps a misaligned PA {pa:#x}");
            assert!(
                owners.check(Pa::new(pa), bytes, Owner::Vm(me)).is_ok(),
                "leaf at {ipa:#x} maps {pa:#x}+{bytes:#x}, not the VM's"
            );
            assert!(pa >= VM_MEM && pa + bytes <= VM_MEM + VM_MEM_LEN, "leaf outside the donated memory");
            let asked = granted
                .iter()
                .filter(|&&(start, end, _)| start < ipa + bytes && ipa < end)
                .fold(Perms::NONE, |p, &(_, _, q)| p.union(q));
            assert!(asked.contains(d.perms()), "leaf at {ipa:#x} has {:?}, more than asked ({asked:?})", d.perms());
        }
    }
});
