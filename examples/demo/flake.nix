# Kiln's demo project: jobs made with builtins.derivation and the host's
# /bin/sh, so it builds without nixpkgs. Some succeed, one fails, one
# depends on the failing one, and their logs are worth reading.
{
  description = "Kiln demo";

  outputs = _:
    let
      system = "x86_64-linux";
      job = name: extra: script:
        builtins.derivation ({
          inherit name system;
          builder = "/bin/sh";
          PATH = "/usr/bin:/bin";
          args = [ "-c" script ];
        } // extra);

      greeting = job "greeting" { } ''
        echo "building the greeting"
        printf 'Hello from Kiln\n' > $out
      '';

      slow = job "slow-report" { } ''
        for i in 1 2 3 4 5 6 7 8 9 10; do
          echo "step $i of 10: still working"
          sleep 1
        done
        printf '\033[32mdone\033[0m after 10 steps\n'
        echo "report written at step 10" > $out
      '';

      combined = job "combined" { inherit greeting slow; } ''
        echo "combining $greeting and $slow"
        cat $greeting $slow > $out
      '';

      broken = job "broken-test" { } ''
        echo "running 3 tests"
        echo "test 1: ok"
        echo "test 2: ok"
        printf '\033[31mtest 3: FAILED\033[0m expected 42, got 41\n'
        exit 1
      '';

      needsBroken = job "needs-broken" { inherit broken; } ''
        echo "this never runs: its input failed"
        cp $broken $out
      '';

      # The demo's machines (two sshd servers on this machine, which
      # scripts/demo starts) get these "system" closures: activating one
      # records it in the host's directory, and the health check reads
      # its health. `scripts/demo break` sets health to "bad" and commits:
      # the canary fails its check and goes back to what it ran before.
      health = "ok";
      machine = host: job "system-${host}" { } ''
        mkdir -p $out/bin
        echo ${health} > $out/health
        printf '%s\n' '#!/bin/sh' \
          'echo "$KILN_PATH" > "$HOST_DIR/active"' \
          'cp "$KILN_PATH/health" "$HOST_DIR/health"' \
          'echo "${host} now runs $KILN_PATH"' > $out/bin/switch-to-configuration
        chmod +x $out/bin/switch-to-configuration
      '';
    in
    {
      hydraJobs = {
        inherit greeting combined;
        slow-report = slow;
        broken-test = broken;
        needs-broken = needsBroken;
        hosts.web1 = machine "web1";
        hosts.web2 = machine "web2";
      };
    };
}
