{ config, lib, pkgs, ... }:

let
  cfg = config.services.kiln;
  format = pkgs.formats.toml { };
  settings = {
    listen = cfg.listen;
    state_dir = cfg.stateDir;
  } // cfg.settings;
  configFile = format.generate "kiln.toml" settings;
in
{
  options.services.kiln = {
    enable = lib.mkEnableOption "Kiln, a CI build coordinator for Nix flakes";

    package = lib.mkOption {
      type = lib.types.package;
      default = pkgs.callPackage ./package.nix { src = ../.; };
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
      description = "Database, git mirrors, logs, cache and keys.";
    };

    settings = lib.mkOption {
      inherit (format) type;
      default = { };
      description = "Further kiln.toml settings (see kiln.example.toml). Secrets only as *_file paths.";
    };
  };

  config = lib.mkIf cfg.enable {
    users.users.kiln = {
      isSystemUser = true;
      group = "kiln";
      home = cfg.stateDir;
    };
    users.groups.kiln = { };

    networking.firewall.allowedTCPPorts =
      lib.mkIf cfg.openFirewall [ (lib.toInt (lib.last (lib.splitString ":" cfg.listen))) ];

    systemd.services.kiln = {
      description = "Kiln CI coordinator";
      wantedBy = [ "multi-user.target" ];
      after = [ "network-online.target" ];
      wants = [ "network-online.target" ];
      path = [ config.nix.package pkgs.git pkgs.openssh ];
      environment.KILN_CONFIG = configFile;
      serviceConfig = {
        ExecStart = "${lib.getExe cfg.package} serve";
        User = "kiln";
        Group = "kiln";
        StateDirectory = lib.mkIf (cfg.stateDir == "/var/lib/kiln") "kiln";
        WorkingDirectory = cfg.stateDir;
        Restart = "on-failure";
        NoNewPrivileges = true;
        PrivateTmp = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        ReadWritePaths = [ cfg.stateDir ];
      };
    };
  };
}
