//! Compiles the C entry points of the planner, ProcessUtility and ExecutorRun hooks (src/hooks_c/) against the PostgreSQL server
//! headers of the pg_config pgrx builds for.

use std::process::Command;

fn pg_config() -> String {
    for variable in ["PGRX_PG_CONFIG_PATH", "PG_CONFIG"] {
        if let Ok(path) = std::env::var(variable) {
            if !path.is_empty() {
                return path;
            }
        }
    }
    "/usr/lib/postgresql/15/bin/pg_config".to_string()
}

fn main() {
    let pg_config = pg_config();
    let output = Command::new(&pg_config)
        .arg("--includedir-server")
        .output()
        .unwrap_or_else(|e| panic!("could not run {pg_config}: {e}"));
    assert!(output.status.success(), "{pg_config} --includedir-server failed");
    let include = String::from_utf8_lossy(&output.stdout).trim().to_string();
    println!("cargo:rerun-if-changed=src/hooks_c/hooks.c");
    println!("cargo:rerun-if-env-changed=PGRX_PG_CONFIG_PATH");
    println!("cargo:rerun-if-env-changed=PG_CONFIG");
    cc::Build::new()
        .file("src/hooks_c/hooks.c")
        .include(&include)
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(true)
        .compile("pg_sharding_hooks");
}
