{ config, lib, pkgs, ... }:

let
  cfg = config.services.kiln;
  format = pkgs.formats.toml { };

  # Secrets reach the service as systemd credentials: readable by it alone,
  # never copied into the Nix store.
  credentialPath = name: "/run/credentials/kiln.service/${name}";

  # Rendered as NixOS renders /etc/nix/machines, `protocol = "ssh-ng"`,
  # ports and store settings in hostName included.
  machinesFile = pkgs.writeText "kiln-machines" (import ./machines.nix cfg.buildMachines);

  databaseUrl =
    if cfg.database == "postgresql"
    then "postgres:///kiln?host=/run/postgresql&user=kiln"
    else "sqlite://${cfg.stateDir}/kiln.db";

  settings = lib.recursiveUpdate
    ({
      listen = cfg.listen;
      state_dir = cfg.stateDir;
      database_url = databaseUrl;
      api_token_files = map credentialPath (lib.attrNames (lib.filterAttrs (n: _: lib.hasPrefix "api-token" n) cfg.secretFiles));
      substituters = cfg.substituters;
      trusted_public_keys = cfg.trustedPublicKeys;
    } // lib.optionalAttrs (cfg.buildMachines != [ ]) { machines_file = "${machinesFile}"; })
    cfg.settings;
  configFile = format.generate "kiln.toml" settings;
  port = lib.toInt (lib.last (lib.splitString ":" cfg.listen));
in
{
  imports = [ ./agent.nix ];

  options.services.kiln = {
    enable = lib.mkEnableOption "Kiln, a CI build coordinator for Nix flakes";

    package = lib.mkOption {
      type = lib.types.package;
      default = pkgs.callPackage ./package.nix { src = ../.; };
      defaultText = lib.literalExpression "the package from Kiln's flake";
      description = "The Kiln package to run.";
    };

    listen = lib.mkOption {
      type = lib.types.str;
      default = "127.0.0.1:3000";
      description = "Address the web UI, API and binary cache listen on.";
    };

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Open the listen port in the firewall.";
    };

    stateDir = lib.mkOption {
      type = lib.types.str;
      default = "/var/lib/kiln";
      description = "Database (SQLite), git mirrors, logs, the binary cache and keys.";
    };

    database = lib.mkOption {
      type = lib.types.enum [ "sqlite" "postgresql" ];
      default = "sqlite";
      description = ''
        `sqlite` keeps the database in the state directory. `postgresql`
        sets up the local PostgreSQL server with a `kiln` database and role
        reached over its Unix socket with peer authentication.
      '';
    };

    buildMachines = lib.mkOption {
      type = lib.types.listOf lib.types.attrs;
      default = config.nix.buildMachines;
      defaultText = lib.literalExpression "config.nix.buildMachines";
      description = ''
        Remote builders, in the form of `nix.buildMachines` (hostName,
        protocol (`ssh`, `ssh-ng` or null), system or systems, sshUser,
        sshKey, maxJobs, speedFactor, supportedFeatures, mandatoryFeatures,
        publicHostKey). Rendered to a machines file as NixOS renders
        /etc/nix/machines; empty builds on this machine.
      '';
    };

    substituters = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = config.nix.settings.substituters or [ ];
      defaultText = lib.literalExpression "config.nix.settings.substituters";
      example = [ "https://cache.nixos.org" ];
      description = ''
        Upstream binary caches whose signed outputs Kiln substitutes instead
        of building. By default the host's own, on NixOS the public cache.
      '';
    };

    trustedPublicKeys = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = config.nix.settings.trusted-public-keys or [ ];
      defaultText = lib.literalExpression "config.nix.settings.trusted-public-keys";
      example = [ "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=" ];
      description = "Keys an upstream narinfo must be signed with to be substituted.";
    };

    secretFiles = lib.mkOption {
      type = lib.types.attrsOf lib.types.path;
      default = { };
      example = lib.literalExpression ''
        {
          api-token = "/run/secrets/kiln-api-token";
          github-token = "/run/secrets/github-token";
          github-webhook = "/run/secrets/github-webhook";
        }
      '';
      description = ''
        Secret files handed to the service as systemd credentials (read by
        systemd as root, visible to Kiln only, never in the Nix store).
        Refer to one in `settings` as `/run/credentials/kiln.service/<name>`;
        names starting with `api-token` become `api_token_files`.
      '';
    };

    settings = lib.mkOption {
      inherit (format) type;
      default = { };
      description = ''
        Further kiln.toml settings (see kiln.example.toml), merged over what
        the options above set. Secrets only as `*_file` paths.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    users.users.kiln = {
      isSystemUser = true;
      group = "kiln";
      home = cfg.stateDir;
    };
    users.groups.kiln = { };

    # Kiln asks the Nix daemon to build and to copy paths.
    nix.settings.trusted-users = [ "kiln" ];

    # Where Kiln keeps the GC roots of queued derivations (as Hydra keeps
    # its evaluator's in gcroots/hydra).
    systemd.tmpfiles.rules = [ "d /nix/var/nix/gcroots/kiln 0755 kiln kiln -" ];

    networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall [ port ];

    services.postgresql = lib.mkIf (cfg.database == "postgresql") {
      enable = true;
      ensureDatabases = [ "kiln" ];
      ensureUsers = [{
        name = "kiln";
        ensureDBOwnership = true;
      }];
    };

    systemd.services.kiln = {
      description = "Kiln CI coordinator";
      wantedBy = [ "multi-user.target" ];
      after = [ "network-online.target" ] ++ lib.optional (cfg.database == "postgresql") "postgresql.service";
      wants = [ "network-online.target" ];
      requires = lib.optional (cfg.database == "postgresql") "postgresql.service";
      path = [ config.nix.package pkgs.git pkgs.openssh ];
      environment.KILN_CONFIG = configFile;
      serviceConfig = {
        ExecStart = "${lib.getExe cfg.package} serve";
        User = "kiln";
        Group = "kiln";
        StateDirectory = lib.mkIf (cfg.stateDir == "/var/lib/kiln") "kiln";
        StateDirectoryMode = "0750";
        WorkingDirectory = cfg.stateDir;
        LoadCredential = lib.mapAttrsToList (name: path: "${name}:${path}") cfg.secretFiles;
        Restart = "on-failure";
        # Open requests finish and state is recorded before Kiln exits.
        TimeoutStopSec = "2min";
        # Hardening: Kiln needs the network, the Nix daemon's socket and
        # its state directory, nothing else.
        NoNewPrivileges = true;
        PrivateTmp = true;
        PrivateDevices = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectClock = true;
        ProtectHostname = true;
        ProtectProc = "invisible";
        RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" ];
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        SystemCallArchitectures = "native";
        SystemCallFilter = [ "@system-service" "~@privileged" ];
        CapabilityBoundingSet = "";
        UMask = "0027";
        ReadWritePaths = [ cfg.stateDir "/nix/var/nix/gcroots/kiln" ];
      };
    };
  };
}
