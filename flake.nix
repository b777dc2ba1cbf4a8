{
  description = "Kiln: a continuous-integration build coordinator for Nix flakes";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAll = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = forAll (pkgs: {
        default = pkgs.callPackage ./nixos-module/package.nix { src = self; };
      });

      devShells = forAll (pkgs: {
        default = pkgs.mkShell {
          packages = with pkgs; [ cargo rustc rustfmt clippy sqlx-cli nix openssh postgresql busybox ];
        };
      });

      overlays.default = final: _prev: {
        kiln = final.callPackage ./nixos-module/package.nix { src = self; };
      };

      nixosModules.default = import ./nixos-module;
      # The pull agent alone, for hosts that do not run Kiln itself.
      nixosModules.agent = import ./nixos-module/agent.nix;

      formatter = forAll (pkgs: pkgs.nixpkgs-fmt);

      checks = forAll (pkgs: {
        package = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        vm = import ./nixos-module/test.nix { inherit pkgs; module = self.nixosModules.default; };
      });
    };
}
