# msharefs: build and install the way distribution packages do it.
#
#   make                                   cargo build --release, then link the versioned
#                                          libmshare.so.0 and libmshare_preload.so
#   make install [DESTDIR=...] [prefix=/usr] [sbindir=...] [libdir=...] ...
#   make uninstall [DESTDIR=...] [prefix=...]
#
# A Makefile with the GNU directory variables and DESTDIR is what packaging tools drive
# (dh_auto_install, rpm's %make_install, PKGBUILDs): no built binary has to run to
# install, `make -n install` shows every step, and each directory can be overridden.
#
# Installed: bin/msharefs; mount.msharefs (a link to it) in $(mounthelperdir), which
# mount(8) searches only in /sbin, so packagers set sbindir=/usr/sbin (merged /usr) or
# mounthelperdir=/sbin; lib/libmshare.so.$(VERSION) with SONAME libmshare.so.0 and
# versioned symbols (packaging/libmshare.map), its links, libmshare.a,
# libmshare_preload.so (exports only libmshare/preload/exports.map), include/mshare.h,
# lib/pkgconfig/mshare.pc, the systemd unit msharefs@.service and the man pages.
#
# Cargo's own target/*/libmshare.so has no SONAME: the tests and examples link and load
# it in place. The versioned libraries are linked here from the static libraries with
# the C compiler, because rustc hands the linker a version script of its own, which the
# GNU linker uses instead of ours.

VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
SOVERSION := $(firstword $(subst ., ,$(VERSION)))

prefix ?= /usr/local
exec_prefix ?= $(prefix)
bindir ?= $(exec_prefix)/bin
sbindir ?= $(exec_prefix)/sbin
libdir ?= $(exec_prefix)/lib
includedir ?= $(prefix)/include
datarootdir ?= $(prefix)/share
mandir ?= $(datarootdir)/man
pkgconfigdir ?= $(libdir)/pkgconfig
systemdunitdir ?= $(prefix)/lib/systemd/system
mounthelperdir ?= $(sbindir)

CARGO ?= cargo
CC ?= cc
PROFILE ?= release
CARGO_TARGET_DIR ?= target
BUILD := $(CARGO_TARGET_DIR)/$(PROFILE)
OUT := $(BUILD)/packaging
INSTALL ?= install

# What rustc reports for linking its static libraries (--print native-static-libs).
NATIVE_LIBS := -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc
SHARED_LDFLAGS := -shared -Wl,-z,relro,-z,now -Wl,--gc-sections

LIBMSHARE := $(OUT)/libmshare.so.$(VERSION)
PRELOAD := $(OUT)/libmshare_preload.so

all: $(LIBMSHARE) $(PRELOAD)

# Cargo decides what is out of date; make then relinks only what cargo changed (it looks
# at the files' times again after the recipe).
$(BUILD)/libmshare.a $(BUILD)/libmshare_preload.a $(BUILD)/msharefs &: FORCE
	$(CARGO) build --workspace --profile $(PROFILE)

FORCE:

$(LIBMSHARE): $(BUILD)/libmshare.a packaging/libmshare.map
	@mkdir -p $(OUT)
	$(CC) $(SHARED_LDFLAGS) -o $@ -Wl,-soname,libmshare.so.$(SOVERSION) \
	    -Wl,--version-script=packaging/libmshare.map \
	    -Wl,--whole-archive $(BUILD)/libmshare.a -Wl,--no-whole-archive $(NATIVE_LIBS)

$(PRELOAD): $(BUILD)/libmshare_preload.a libmshare/preload/exports.map
	@mkdir -p $(OUT)
	$(CC) $(SHARED_LDFLAGS) -o $@ \
	    -Wl,--version-script=libmshare/preload/exports.map \
	    -Wl,--whole-archive $(BUILD)/libmshare_preload.a -Wl,--no-whole-archive $(NATIVE_LIBS)

install: all
	$(INSTALL) -d $(DESTDIR)$(bindir) $(DESTDIR)$(mounthelperdir) $(DESTDIR)$(libdir) \
	    $(DESTDIR)$(includedir) $(DESTDIR)$(pkgconfigdir) $(DESTDIR)$(systemdunitdir) \
	    $(DESTDIR)$(mandir)/man3 $(DESTDIR)$(mandir)/man8
	$(INSTALL) -m 0755 $(BUILD)/msharefs $(DESTDIR)$(bindir)/msharefs
	ln -sf $(bindir)/msharefs $(DESTDIR)$(mounthelperdir)/mount.msharefs
	$(INSTALL) -m 0755 $(LIBMSHARE) $(DESTDIR)$(libdir)/libmshare.so.$(VERSION)
	ln -sf libmshare.so.$(VERSION) $(DESTDIR)$(libdir)/libmshare.so.$(SOVERSION)
	ln -sf libmshare.so.$(SOVERSION) $(DESTDIR)$(libdir)/libmshare.so
	$(INSTALL) -m 0644 $(BUILD)/libmshare.a $(DESTDIR)$(libdir)/libmshare.a
	$(INSTALL) -m 0755 $(PRELOAD) $(DESTDIR)$(libdir)/libmshare_preload.so
	$(INSTALL) -m 0644 libmshare/include/mshare.h $(DESTDIR)$(includedir)/mshare.h
	sed -e 's|@prefix@|$(prefix)|' -e 's|@exec_prefix@|$(exec_prefix)|' \
	    -e 's|@libdir@|$(libdir)|' -e 's|@includedir@|$(includedir)|' \
	    -e 's|@version@|$(VERSION)|' -e 's|@native_libs@|$(NATIVE_LIBS)|' \
	    packaging/mshare.pc.in > $(DESTDIR)$(pkgconfigdir)/mshare.pc
	sed -e 's|@bindir@|$(bindir)|' packaging/msharefs@.service.in \
	    > $(DESTDIR)$(systemdunitdir)/msharefs@.service
	chmod 0644 $(DESTDIR)$(pkgconfigdir)/mshare.pc $(DESTDIR)$(systemdunitdir)/msharefs@.service
	$(INSTALL) -m 0644 packaging/man/libmshare.3 $(DESTDIR)$(mandir)/man3/libmshare.3
	$(INSTALL) -m 0644 packaging/man/msharefs.8 $(DESTDIR)$(mandir)/man8/msharefs.8
	$(INSTALL) -m 0644 packaging/man/mount.msharefs.8 $(DESTDIR)$(mandir)/man8/mount.msharefs.8

uninstall:
	rm -f $(DESTDIR)$(bindir)/msharefs $(DESTDIR)$(mounthelperdir)/mount.msharefs \
	    $(DESTDIR)$(libdir)/libmshare.so.$(VERSION) \
	    $(DESTDIR)$(libdir)/libmshare.so.$(SOVERSION) $(DESTDIR)$(libdir)/libmshare.so \
	    $(DESTDIR)$(libdir)/libmshare.a $(DESTDIR)$(libdir)/libmshare_preload.so \
	    $(DESTDIR)$(includedir)/mshare.h $(DESTDIR)$(pkgconfigdir)/mshare.pc \
	    $(DESTDIR)$(systemdunitdir)/msharefs@.service \
	    $(DESTDIR)$(mandir)/man3/libmshare.3 $(DESTDIR)$(mandir)/man8/msharefs.8 \
	    $(DESTDIR)$(mandir)/man8/mount.msharefs.8

.PHONY: all install uninstall
