//! The `tollgate` binary.

use clap::Parser;

// mimalloc: less CPU per allocation than glibc's malloc on the request path, and freed pages go
// back to the system after a load (bench/README.md has the measurement). The alloc-count
// build installs its own counting wrapper around it instead.
#[cfg(not(feature = "alloc-count"))]
#[global_allocator]
static GLOBAL: tollgate::allocator::Allocator = tollgate::allocator::Allocator;

fn main() -> std::process::ExitCode {
    tollgate::allocator::tune();
    tollgate::store::sqlite_multithread();
    let cli = tollgate::cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(|| {
            tollgate::allocator::on_worker_park();
        })
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tollgate: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(tollgate::cli::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
