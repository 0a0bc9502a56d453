//! sim-machine: a simulated arm64 machine that hosts hyp-core the way EL2
//! does on hardware.
//!
//! vCPU threads run workloads ([`workload`]); every access goes through a
//! software MMU ([`mmu`]) that walks the *real* stage-2 descriptor bytes the
//! core wrote, from the VTCR_EL2/VTTBR_EL2 values the core computed, with a
//! small TLB that the core's TLB maintenance clears. A failed walk raises an
//! abort whose ESR_EL2/HPFAR_EL2/FAR_EL2 are encoded as the Arm ARM says
//! hardware would ([`syndrome`]); the core forwards it to the daemon over the
//! rings and installs what comes back ([`machine`]).

pub mod layout;
pub mod machine;
pub mod mmu;
pub mod phys;
pub mod probe;
pub mod stage1;
pub mod syndrome;
pub mod workload;
