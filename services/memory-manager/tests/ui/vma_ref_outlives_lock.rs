// KVM's TOCTOU: a VMA pointer used after mmap_lock was dropped. Here the VMA
// is borrowed from the read guard, so it cannot leave the guard's scope.
use memory_manager::memory::addr::Hva;
use memory_manager::memory::vma::{Vma, Vmas};

fn vma_after_unlock(vmas: &Vmas, hva: Hva) -> &Vma {
    let guard = vmas.read();
    let vma = guard.find(hva).unwrap();
    drop(guard);
    vma
}

fn main() {
    let vmas = Vmas::default();
    let _ = vma_after_unlock(&vmas, Hva::new(0));
}
