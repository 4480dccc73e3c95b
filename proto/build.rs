fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc: no system package needed to build.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        // Weight payloads are `Bytes`: decoding slices the received buffer, no copy.
        .bytes(".tandem.v1.WeightBucket.data")
        .compile_protos(
            &[
                "proto/tandem/v1/health.proto",
                "proto/tandem/v1/coordinator.proto",
                "proto/tandem/v1/trainer.proto",
                "proto/tandem/v1/reward.proto",
                "proto/tandem/v1/environment.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}
