//! Compile-fail tests: misuse the type system refuses.

#[test]
fn vma_reference_cannot_outlive_its_lock() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/vma_ref_outlives_lock.rs");
}
