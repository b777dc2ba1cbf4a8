{ config, lib, pkgs, ... }:

let
  cfg = config.services.kiln-agent;
in
{
  options.services.kiln-agent = {
    enable = lib.mkEnableOption "the Kiln pull agent, which deploys the closures Kiln assigns to this host";

    package = lib.mkOption {
      type = lib.types.package;
      default = pkgs.callPackage ./package.nix { src = ../.; };
      defaultText = lib.literalExpression "the package from Kiln's flake";
      description = "The Kiln package whose `kiln agent` runs.";
    };

    server = lib.mkOption {
      type = lib.types.str;
      example = "https://ci.example.org";
      description = "Kiln's URL; the agent connects out to it.";
    };

    host = lib.mkOption {
      type = lib.types.str;
      default = config.networking.hostName;
      defaultText = lib.literalExpression "config.networking.hostName";
      description = "This host's name in its environment (a host with `pull = true`).";
    };

    tokenFile = lib.mkOption {
      type = lib.types.path;
      example = "/run/secrets/kiln-agent-token";
      description = ''
        The file holding this host's agent token, the same as the server's
        `[deploy] agent_token_files.<host>`. Read as a systemd credential,
        never copied into the Nix store.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    systemd.services.kiln-agent = {
      description = "Kiln pull agent";
      wantedBy = [ "multi-user.target" ];
      after = [ "network-online.target" ];
      wants = [ "network-online.target" ];
      path = [ config.nix.package pkgs.coreutils pkgs.util-linux ];
      # The agent runs switch-to-configuration itself: restarting it in the
      # middle would end the activation it is watching.
      restartIfChanged = false;
      serviceConfig = {
        ExecStart = "${lib.getExe cfg.package} agent --server ${lib.escapeShellArg cfg.server} --host ${lib.escapeShellArg cfg.host} --token-file %d/token";
        LoadCredential = [ "token:${cfg.tokenFile}" ];
        Restart = "always";
        RestartSec = 5;
        # The activation and its watchdog run detached; stopping the agent
        # must not kill them halfway.
        KillMode = "process";
      };
    };
  };
}
