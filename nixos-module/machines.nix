# Nix's machines-file format, one line per build machine, from
# `nix.buildMachines`-shaped entries, written as NixOS writes
# /etc/nix/machines (nixos/modules/config/nix-remote-build.nix): the URI is
# `protocol://` (`ssh` by default, `ssh-ng`, or none when protocol is
# null), `sshUser@` and `hostName` (which may carry `:port` and store
# settings such as `?remote-program=`); then systems, sshKey, maxJobs,
# speedFactor, supported features (mandatory ones included), mandatory
# features and publicHostKey, `-` for what is unset. So Kiln reads the same
# lines as the Nix daemon. Only builtins: Kiln's tests evaluate this file
# with plain nix-instantiate. A field an entry lacks takes NixOS's default.
machines:
let
  orDash = v: if v == null || v == "" || v == [ ] then "-" else v;
  commas = l: orDash (builtins.concatStringsSep "," l);
  line = m:
    let
      get = name: default: m.${name} or default;
      protocol = get "protocol" "ssh";
      user = get "sshUser" null;
      system = get "system" null;
      mandatory = get "mandatoryFeatures" [ ];
      # A hostName that is already a URI is taken as written.
      scheme = if protocol == null || builtins.match ".*://.*" m.hostName != null then "" else "${protocol}://";
    in
    builtins.concatStringsSep " " [
      "${scheme}${if user == null then "" else "${user}@"}${m.hostName}"
      (commas (if system != null then [ system ] else get "systems" [ ]))
      (orDash (get "sshKey" null))
      (toString (get "maxJobs" 1))
      (toString (get "speedFactor" 1))
      (commas (get "supportedFeatures" [ ] ++ mandatory))
      (commas mandatory)
      (orDash (get "publicHostKey" null))
    ];
in
builtins.concatStringsSep "" (map (m: line m + "\n") machines)
