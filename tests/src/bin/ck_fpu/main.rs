//! `ck_fpu`: x86 FPU/SSE/AVX state across a dump and restore (the program
//! and its protocol are in `x86_64.rs`). Other architectures build a stub
//! that says so and exits 2, so that the crate builds for them.

#[cfg(target_arch = "x86_64")]
mod x86_64;

#[cfg(target_arch = "x86_64")]
fn main() {
    x86_64::main()
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    eprintln!("ck_fpu checks x86 FPU/SSE/AVX state: x86_64 only");
    std::process::exit(2)
}
