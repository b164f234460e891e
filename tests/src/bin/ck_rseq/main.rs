//! `ck_rseq`: rseq registrations and critical sections across a dump and
//! restore (the program and its protocol are in `x86_64.rs`: its critical
//! sections are x86 assembly). Other architectures build a stub that says
//! so and exits 2, so that the crate builds for them.

#[cfg(target_arch = "x86_64")]
mod x86_64;

#[cfg(target_arch = "x86_64")]
fn main() {
    x86_64::main()
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    eprintln!("ck_rseq's critical sections are x86 assembly: x86_64 only");
    std::process::exit(2)
}
