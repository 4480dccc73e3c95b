"""The gRPC stubs of Tandem's `tandem.v1` services, generated when the package is built
(setup.py runs grpcio-tools' protoc on the repository's proto/proto/tandem/v1/*.proto).
Import them through `tandem_sdk.stubs`, which says what to do when they are missing."""
