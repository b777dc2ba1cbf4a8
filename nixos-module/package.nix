{ lib, rustPlatform, src }:

rustPlatform.buildRustPackage {
  pname = "kiln";
  version = (lib.importTOML ../Cargo.toml).package.version;
  inherit src;
  cargoLock.lockFile = ../Cargo.lock;
  # The integration tests need sshd, PostgreSQL and a writable Nix store.
  doCheck = false;
  meta = {
    description = "A continuous-integration build coordinator for Nix flakes";
    license = with lib.licenses; [ mit asl20 ];
    mainProgram = "kiln";
  };
}
