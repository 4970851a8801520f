//! The etcd gRPC stubs are generated from `src/store/etcd/rpc.proto` and committed, so a build
//! needs no protobuf compiler. This regenerates them with the pure-Rust `protox` and tonic's
//! generator, and fails when the committed file is stale.

use std::path::Path;

#[it::test]
fn committed_etcd_stubs_match_the_proto() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/store/etcd");
    let descriptors = protox::compile(["rpc.proto"], [&dir]).expect("rpc.proto compiles");
    let out = tempfile::tempdir().unwrap();
    tonic_prost_build::configure()
        .build_server(false)
        .build_transport(false)
        .out_dir(out.path())
        .compile_fds(descriptors)
        .expect("tonic generates the stubs");
    let fresh = std::fs::read_to_string(out.path().join("etcdserverpb.rs")).unwrap();
    let committed_path = dir.join("etcdserverpb.rs");
    if std::env::var_os("BOOTSYNC_REGENERATE").is_some() {
        std::fs::write(&committed_path, &fresh).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    assert!(
        committed == fresh,
        "{} is stale: regenerate it with `BOOTSYNC_REGENERATE=1 cargo test --test it etcd_stubs`",
        committed_path.display()
    );
}
