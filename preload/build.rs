//! Compiles `src/execl.c`: the bodies of `execl`, `execle` and `execlp`, which take a
//! variable argument list (Rust on stable cannot define a C-variadic function; the exported
//! symbols are naked jumps to these, in `hooks/process.rs`).

fn main() {
    println!("cargo:rerun-if-changed=src/execl.c");
    cc::Build::new()
        .file("src/execl.c")
        .flag("-fvisibility=hidden")
        .compile("sdp_execl");
}
