//! Relinks the image when its linker script changes (cargo passes the
//! script through rustflags and would not notice on its own).

fn main() {
    println!("cargo:rerun-if-changed=link.ld");
}
