# A NixOS VM test: Kiln from the module, a remote builder over SSH, and the
# demo project evaluated and built on it. Run with `nix flake check` (it
# needs nixpkgs and KVM, so it does not run in Kiln's own CI).
{ pkgs, module }:

let
  demo = ../examples/demo;
  snakeoilKey = pkgs.runCommand "builder-key" { nativeBuildInputs = [ pkgs.openssh ]; } ''
    mkdir $out
    ssh-keygen -q -t ed25519 -N "" -f $out/id_ed25519
  '';
in
pkgs.testers.runNixOSTest {
  name = "kiln";

  nodes.builder = { ... }: {
    services.openssh.enable = true;
    users.users.root.openssh.authorizedKeys.keyFiles = [ "${snakeoilKey}/id_ed25519.pub" ];
    nix.settings.sandbox = false;
  };

  nodes.kiln = { ... }: {
    imports = [ module ];
    environment.systemPackages = [ pkgs.git ];
    nix.settings.sandbox = false;
    nix.settings.experimental-features = [ "nix-command" "flakes" ];
    services.kiln = {
      enable = true;
      openFirewall = true;
      listen = "0.0.0.0:3000";
      database = "postgresql";
      buildMachines = [{
        hostName = "builder";
        sshUser = "root";
        sshKey = "/etc/kiln-builder-key";
        system = "x86_64-linux";
        maxJobs = 2;
        speedFactor = 1;
        supportedFeatures = [ ];
        mandatoryFeatures = [ ];
        publicHostKey = null;
      }];
      settings.projects = [{
        name = "demo";
        repo = "/srv/demo";
      }];
    };
    environment.etc."kiln-builder-key" = {
      source = "${snakeoilKey}/id_ed25519";
      mode = "0400";
      user = "kiln";
    };
  };

  testScript = ''
    start_all()
    builder.wait_for_unit("sshd.service")
    kiln.succeed(
        "cp -r ${demo} /srv/demo && chmod -R u+w /srv/demo",
        "cd /srv/demo && git init -q -b main && git add -A"
        + " && git -c user.name=t -c user.email=t@t commit -q -m demo",
    )
    kiln.wait_for_unit("kiln.service")
    kiln.wait_for_open_port(3000)
    kiln.wait_until_succeeds(
        "curl -sf -H 'Accept: application/json' localhost:3000/jobset/demo/main/evals"
        + " | grep -q succeeded",
        timeout=180,
    )
    kiln.wait_until_succeeds(
        "curl -sf localhost:3000/metrics | grep -q 'kiln_builds_finished{status=\"succeeded\"} [1-9]'",
        timeout=300,
    )
    kiln.succeed("curl -sf localhost:3000/nix-cache-info")
  '';
}
