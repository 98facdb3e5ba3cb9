#!/usr/bin/env bash
# Make a small busybox root filesystem in DIR (for examples and tests).
set -euo pipefail
dir=${1:?usage: busybox-rootfs.sh DIR}
bb=/bin/busybox
mkdir -p "$dir"/{bin,etc,tmp,root,home/alice,proc,sys,dev}
cp "$bb" "$dir/bin/busybox"
# Relative links: `busybox --install` would point at the host's path.
for applet in $("$bb" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$dir/bin/$applet"
done
chmod 1777 "$dir/tmp"
chown 1000:1000 "$dir/home/alice"
cat > "$dir/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
alice:x:1000:1000:alice:/home/alice:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
PASSWD
cat > "$dir/etc/group" <<'GROUP'
root:x:0:
alice:x:1000:
staff:x:50:alice
nogroup:x:65534:
GROUP
