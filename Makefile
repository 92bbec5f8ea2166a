# kvcrypt: build and install.
#   make                      # cargo build --release
#   make install              # as root; into /usr (binaries in /usr/sbin, as the units expect)
#   make install DESTDIR=/tmp/pkg PREFIX=/usr/local   # staged / other prefix (paths in units and
#                                                     # rules are rewritten to match)
# After a real install: systemctl daemon-reload && udevadm control --reload
# then write /etc/kvcrypt/kvcrypt.toml (example next to it) and
#   systemctl enable --now kvcrypt-agent.service

PREFIX      ?= /usr
SBINDIR     ?= $(PREFIX)/sbin
BINDIR      ?= $(PREFIX)/bin
SYSCONFDIR  ?= /etc
LIBDIR      ?= $(PREFIX)/lib
UNITDIR     ?= $(LIBDIR)/systemd/system
UDEVRULESDIR ?= $(LIBDIR)/udev/rules.d
MODULESLOADDIR ?= $(LIBDIR)/modules-load.d
MANDIR      ?= $(PREFIX)/share/man
DOCDIR      ?= $(PREFIX)/share/doc/kvcrypt
BASHCOMPDIR ?= $(PREFIX)/share/bash-completion/completions
ZSHCOMPDIR  ?= $(PREFIX)/share/zsh/vendor-completions
FISHCOMPDIR ?= $(PREFIX)/share/fish/vendor_completions.d

CARGO       ?= cargo
CARGO_TARGET_DIR ?= target
KVCRYPT     ?= $(CARGO_TARGET_DIR)/release/kvcrypt
EMULATOR    ?= $(CARGO_TARGET_DIR)/release/kvcrypt-kv-emulator

INSTALL     ?= install
# Rewrites the binary path the units and rules were written with.
FIXPATHS    = sed -e 's|/usr/sbin/kvcrypt|$(SBINDIR)/kvcrypt|g' -e 's|/etc/kvcrypt|$(SYSCONFDIR)/kvcrypt|g'

UNITS = systemd/kvcrypt-agent.service systemd/kvcrypt-attach@.service systemd/kvcrypt.target
RULES = udev/60-kvcrypt.rules

.PHONY: all build install uninstall

all: build

build:
	$(CARGO) build --workspace --release --bins

$(KVCRYPT) $(EMULATOR):
	$(CARGO) build --workspace --release --bins

install: $(KVCRYPT) $(EMULATOR)
	$(INSTALL) -d -m 0755 $(DESTDIR)$(SBINDIR) $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) \
		$(DESTDIR)$(UDEVRULESDIR) $(DESTDIR)$(MODULESLOADDIR) $(DESTDIR)$(MANDIR)/man1 \
		$(DESTDIR)$(DOCDIR) $(DESTDIR)$(BASHCOMPDIR) $(DESTDIR)$(ZSHCOMPDIR) $(DESTDIR)$(FISHCOMPDIR)
	$(INSTALL) -d -m 0700 $(DESTDIR)$(SYSCONFDIR)/kvcrypt
	$(INSTALL) -m 0755 $(KVCRYPT) $(DESTDIR)$(SBINDIR)/kvcrypt
	$(INSTALL) -m 0755 $(EMULATOR) $(DESTDIR)$(BINDIR)/kvcrypt-kv-emulator
	for u in $(UNITS); do \
		$(FIXPATHS) $$u > $(DESTDIR)$(UNITDIR)/$$(basename $$u) && \
		chmod 0644 $(DESTDIR)$(UNITDIR)/$$(basename $$u) || exit 1; \
	done
	$(FIXPATHS) $(RULES) > $(DESTDIR)$(UDEVRULESDIR)/60-kvcrypt.rules
	chmod 0644 $(DESTDIR)$(UDEVRULESDIR)/60-kvcrypt.rules
	printf 'loop\nfuse\nublk_drv\n' > $(DESTDIR)$(MODULESLOADDIR)/kvcrypt.conf
	$(INSTALL) -m 0644 examples/kvcrypt.toml $(DESTDIR)$(DOCDIR)/kvcrypt.toml.example
	$(INSTALL) -m 0600 examples/kvcrypt.toml $(DESTDIR)$(SYSCONFDIR)/kvcrypt/kvcrypt.toml.example
	$(KVCRYPT) man --out-dir $(DESTDIR)$(MANDIR)/man1
	$(KVCRYPT) completions bash > $(DESTDIR)$(BASHCOMPDIR)/kvcrypt
	$(KVCRYPT) completions zsh > $(DESTDIR)$(ZSHCOMPDIR)/_kvcrypt
	$(KVCRYPT) completions fish > $(DESTDIR)$(FISHCOMPDIR)/kvcrypt.fish
	@if [ -z "$(DESTDIR)" ]; then \
		echo "installed. Now: systemctl daemon-reload && udevadm control --reload"; \
		echo "then write $(SYSCONFDIR)/kvcrypt/kvcrypt.toml and: systemctl enable --now kvcrypt-agent.service"; \
	fi

uninstall:
	rm -f $(DESTDIR)$(SBINDIR)/kvcrypt $(DESTDIR)$(BINDIR)/kvcrypt-kv-emulator
	for u in $(UNITS); do rm -f $(DESTDIR)$(UNITDIR)/$$(basename $$u); done
	rm -f $(DESTDIR)$(UDEVRULESDIR)/60-kvcrypt.rules $(DESTDIR)$(MODULESLOADDIR)/kvcrypt.conf
	rm -f $(DESTDIR)$(MANDIR)/man1/kvcrypt.1 $(DESTDIR)$(MANDIR)/man1/kvcrypt-*.1
	rm -f $(DESTDIR)$(BASHCOMPDIR)/kvcrypt $(DESTDIR)$(ZSHCOMPDIR)/_kvcrypt $(DESTDIR)$(FISHCOMPDIR)/kvcrypt.fish
	rm -rf $(DESTDIR)$(DOCDIR)
	rm -f $(DESTDIR)$(SYSCONFDIR)/kvcrypt/kvcrypt.toml.example
