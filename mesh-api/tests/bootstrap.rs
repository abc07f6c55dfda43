//! Regenerates the protobuf code and fails if the checked-in `src/gen` differs.
//!
//! Run with `FEDMESH_BLESS=1` to write the regenerated files into `src/gen`.

// Tests panic on failure by design: unwrap there is an assertion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

#[test]
fn generated_code_is_current() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tempfile::tempdir().expect("temp dir");
    let protos: Vec<PathBuf> = mesh_api::PROTO_FILES.iter().map(|p| root.join(p)).collect();
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .out_dir(out.path())
        .compile_protos(&protos, &[root.join("proto")])
        .expect("protoc compiles the fedmesh protos (is protobuf-compiler installed?)");

    let gen_dir = root.join("src/gen");
    let bless = std::env::var_os("FEDMESH_BLESS").is_some();
    let mut stale = Vec::new();
    for entry in std::fs::read_dir(out.path()).expect("read generated dir") {
        let entry = entry.expect("dir entry");
        let name = entry.file_name();
        let fresh = std::fs::read_to_string(entry.path()).expect("read generated file");
        let checked_in = gen_dir.join(&name);
        let old = std::fs::read_to_string(&checked_in).unwrap_or_default();
        if old != fresh {
            if bless {
                std::fs::write(&checked_in, &fresh).expect("write src/gen");
            } else {
                stale.push(name.to_string_lossy().into_owned());
            }
        }
    }
    assert!(
        stale.is_empty(),
        "generated code in mesh-api/src/gen is stale for {stale:?}: run \
         `FEDMESH_BLESS=1 cargo test -p mesh-api --test bootstrap` and commit the result"
    );
}
