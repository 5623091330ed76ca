#!/bin/sh
# Undo on one node what the fwdproxy DaemonSet's init container wrote there, after
# `kubectl delete -k ...`. Run as root on the node, or from a workstation for every node:
#   for n in $(kubectl get nodes -o name); do
#     kubectl debug "$n" -i -q --profile=sysadmin --image=busybox:1.37 -- \
#       chroot /host sh -s < deploy/kubernetes/node-undo.sh
#   done
# (then delete the node-debugger-* pods it leaves behind).
#   sh node-undo.sh [ROOT]    ROOT: prefix for every path (default: /)
# A file `gen` replaced is restored from its .bak when that copy predates fwdproxy; a file
# fwdproxy created is removed; anything else is left alone with a message. containerd reads
# certs.d on every pull; k3s/RKE2 read registries.yaml at start: restart them. The cache stays in
# /var/cache/fwdproxy (remove it to free the space). tests/test_deploy.py runs this script.
set -eu
root=${1:-}
root=${root%/}
changed=

# $1 file, $2 marker only fwdproxy's files contain, $3 the file's content without comments
# and blank lines when fwdproxy wrote all of it (a shell pattern).
undo() {
  f=$root$1
  [ -e "$f" ] || [ -e "$f.bak" ] || return 0
  if [ -f "$f.bak" ] && ! grep -q "$2" "$f.bak"; then
    mv -f "$f.bak" "$f"
    echo "$1: restored the file from before fwdproxy"
    changed=1
    return 0
  fi
  body=$(grep -v '^[[:space:]]*#' "$f" 2>/dev/null | grep -v '^[[:space:]]*$' || true)
  # shellcheck disable=SC2254  # $3 is a pattern on purpose
  case "$body" in
    $3)
      rm -f "$f" "$f.bak"
      echo "$1: removed"
      changed=1
      ;;
    *)
      echo "$1: has more than fwdproxy wrote; remove its mirror entry by hand" >&2
      ;;
  esac
}

nl='
'
undo /etc/containerd/certs.d/_default/hosts.toml 'fwdproxy gen containerd-mirror' \
  "\[host.\"http://*\"\]${nl}  capabilities = \[\"pull\", \"resolve\"\]"
rmdir "$root/etc/containerd/certs.d/_default" 2>/dev/null || true
changed=
for dist in k3s rke2; do
  undo "/etc/rancher/$dist/registries.yaml" 'fwdproxy gen k3s-mirror' \
    "mirrors:${nl}  '\*':${nl}    endpoint:${nl}    - http://*"
done
if [ -n "$changed" ]; then
  echo "to apply: systemctl restart k3s (k3s-agent, rke2-server, rke2-agent): registries.yaml" \
    "is read at start"
fi
