#!/usr/bin/env bash
# vagrant/provision.sh ROLE IP: provisions one machine of the Vagrant lab
# (vagrant/Vagrantfile), as root, from the repository copy at /xknock.
#
#   every role   scripts/setup (BCC, the venv at /opt/xknock/venv, bpffs), then
#                `xknock` on root's PATH (/usr/local/sbin) and netcat for probes
#   server       the lab's config at /etc/xknock/xknock.toml (kept if present),
#                the systemd unit (installed, not enabled) and a TCP service on
#                port 22 (sshd is already there)
#
# Idempotent: `vagrant provision` runs it again and changes nothing new.
set -euo pipefail

ROLE="${1:?usage: provision.sh server|client|attacker IP}"
IP="${2:?usage: provision.sh ROLE IP}"
REPO=/xknock
say() { echo "provision(${ROLE}): $*"; }

[[ -x "${REPO}/scripts/setup" ]] ||
    { echo "provision: ${REPO}/scripts/setup is missing: is the rsync synced folder there? (vagrant rsync)" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive
"${REPO}/scripts/setup"

ln -sfn /opt/xknock/venv/bin/xknock /usr/local/sbin/xknock
if ! dpkg-query -W -f='${db:Status-Status}' netcat-openbsd 2>/dev/null | grep -qx installed; then
    apt-get install -y -qq --no-install-recommends netcat-openbsd >/dev/null
fi

# The interface that carries the lab's address (eth1 on Debian's box; found,
# not assumed).
IFACE="$(ip -o -4 addr show to "${IP}/32" | awk '{print $2; exit}')"
[[ -n "${IFACE}" ]] || { echo "provision: no interface has ${IP}" >&2; exit 1; }
echo "${IFACE}" >/etc/xknock-lab-iface

if [[ "${ROLE}" == server ]]; then
    install -d -m 0755 /etc/xknock
    if [[ ! -e /etc/xknock/xknock.toml ]]; then
        install -m 0600 "${REPO}/vagrant/xknock.toml" /etc/xknock/xknock.toml
        say "installed /etc/xknock/xknock.toml"
    fi
    install -m 0644 "${REPO}/packaging/systemd/xknock@.service" /etc/systemd/system/xknock@.service
    systemctl daemon-reload
    say "ready: sudo xknock attach ${IFACE} -c /etc/xknock/xknock.toml   (or: sudo systemctl start xknock@${IFACE})"
else
    say "ready: xknock knock 192.168.56.10 tcp:7000 udp:8000 tcp:9000"
fi
