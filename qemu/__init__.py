"""The QEMU harness: the real agent, installed as on a Pi, booted on an emulated arm64 board.

Modules (docs/qemu.md tells the whole story):

    mirror.py     which Debian mirror to debootstrap from: read from this machine's apt sources
    initramfs.py  a small initramfs built on the host (module order, cpio), no mkinitramfs
    image.py      `make qemu-image`: debootstrap, kernel, install.sh, pack; cached by input hash
    bundle.py     the per-boot provisioning bundle (agent.toml, keys) on a small seed disk
    relay.py      stdio <-> TCP, run by QEMU's guestfwd for each guest connection to the broker
    qga.py        a client for the QEMU guest agent (run a command in the guest, power off)
    harness.py    boot the image next to an emulated hall; what tests/qemu/ drives

Nothing here is installed with the package: the harness runs from a source checkout.
"""
