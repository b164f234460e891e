/*
 * pacloop: the arm64 VM lane's pointer-authentication workload
 * (`cargo xtask vm-test arm64`). It shows whether a checkpoint/restore kept
 * the process's PAC keys and its enabled-keys mask.
 *
 *   pacloop STATUS_FILE
 *
 * Setup: requires HWCAP_PACA and HWCAP_PACG; disables the APDB key with
 * PR_PAC_SET_ENABLED_KEYS (a mask no fresh process has) and reads the mask
 * back; signs one fixed pointer with four fixed modifiers under the APIA and
 * APDA keys (pacia, pacda), the generic key (pacga) and the disabled APDB key
 * (pacdb: a no-op while APDB is disabled) and keeps the results. Prints
 * `ready pid=N`. The status shows the signatures under the first modifier.
 *
 * Then forever: a chain of non-inlined, non-leaf functions (built with
 * -mbranch-protection=standard, so each signs its return address with
 * paciasp and authenticates it before returning) re-signs the pointer, re-
 * reads the mask and compares everything with the kept values; the deepest
 * function sleeps 1 ms, so a frozen pacloop almost always has signed return
 * addresses on its stack. A 1 MiB buffer is rewritten as it goes (pages for
 * the pre-dumps to find). About every 100 ms the state is printed to stdout
 * and written (atomically: temporary file + rename) to STATUS_FILE as one
 * JSON line; the file is reopened every time, so it needs no state that a
 * restore must carry.
 *
 * After a restore that lost the keys, a return address signed with the old
 * APIA key fails authentication (the process dies of SIGSEGV or SIGILL), or a
 * re-signed value differs: pacloop writes `"ok":false` with a `mismatch`
 * message naming what changed and exits with code 3. Exit code 2: the CPU or
 * kernel lacks what is needed (the message says what).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

/* include/uapi/linux/prctl.h (Linux 5.0 and 5.13) */
#ifndef PR_PAC_APIAKEY
#define PR_PAC_APIAKEY (1UL << 0)
#define PR_PAC_APIBKEY (1UL << 1)
#define PR_PAC_APDAKEY (1UL << 2)
#define PR_PAC_APDBKEY (1UL << 3)
#endif
#ifndef PR_PAC_SET_ENABLED_KEYS
#define PR_PAC_SET_ENABLED_KEYS 60
#define PR_PAC_GET_ENABLED_KEYS 61
#endif
/* arch/arm64/include/uapi/asm/hwcap.h */
#ifndef HWCAP_PACA
#define HWCAP_PACA (1UL << 30)
#endif
#ifndef HWCAP_PACG
#define HWCAP_PACG (1UL << 31)
#endif

#define ALL_ADDRESS_KEYS \
	(PR_PAC_APIAKEY | PR_PAC_APIBKEY | PR_PAC_APDAKEY | PR_PAC_APDBKEY)
/* Every address key but APDB: what this process runs with. */
#define WANT_MASK (ALL_ADDRESS_KEYS & ~PR_PAC_APDBKEY)

/* An arbitrary user-space-looking pointer, signed with several modifiers:
 * with top-byte-ignore a data or instruction pointer's PAC has only 7 bits
 * here (bits 54-48), so one signature equals the plain pointer, or survives
 * a key change, one time in 128; four make that 2^-28. */
static const uint64_t POINTER = 0x0000aaaa12345670ULL;
static const uint64_t MODIFIERS[4] = {
	0x7465726e2d706163ULL, /* "tern-pac" */
	1, 0xffffffffffffffffULL, 0x0123456789abcdefULL,
};
#define NMOD (sizeof MODIFIERS / sizeof MODIFIERS[0])

struct sigs {
	uint64_t apia[NMOD], apda[NMOD], apdb[NMOD], apga[NMOD];
};

static struct sigs kept;
static long kept_mask;
static const char *status_path;
static volatile uint64_t iterations;
static unsigned char buffer[1 << 20];

/* `.arch armv8.3-a` lets the assembler take the PAC instructions without
 * building the whole file for v8.3 (which would turn the compiler's
 * paciasp/autiasp pairs into retaa). */
static struct sigs sign_all(void)
{
	struct sigs s;
	uint64_t p;
	for (unsigned i = 0; i < NMOD; i++) {
		uint64_t m = MODIFIERS[i];
		p = POINTER;
		__asm__ volatile(".arch armv8.3-a\n\tpacia %0, %1" : "+r"(p) : "r"(m));
		s.apia[i] = p;
		p = POINTER;
		__asm__ volatile(".arch armv8.3-a\n\tpacda %0, %1" : "+r"(p) : "r"(m));
		s.apda[i] = p;
		p = POINTER;
		__asm__ volatile(".arch armv8.3-a\n\tpacdb %0, %1" : "+r"(p) : "r"(m));
		s.apdb[i] = p;
		__asm__ volatile(".arch armv8.3-a\n\tpacga %0, %1, %2"
				 : "=r"(s.apga[i])
				 : "r"(POINTER), "r"(m));
	}
	return s;
}

/* Whether every one of `v` is the plain pointer. */
static int all_plain(const uint64_t v[NMOD])
{
	for (unsigned i = 0; i < NMOD; i++)
		if (v[i] != POINTER)
			return 0;
	return 1;
}

static long get_mask(void)
{
	return prctl(PR_PAC_GET_ENABLED_KEYS, 0, 0, 0, 0);
}

static void write_status(const char *mismatch)
{
	char line[512];
	char tmp[4096];
	FILE *f;
	int n = snprintf(line, sizeof line,
			 "{\"pid\":%d,\"iterations\":%" PRIu64 ",\"mask\":%ld,"
			 "\"apia\":\"0x%016" PRIx64 "\",\"apda\":\"0x%016" PRIx64
			 "\",\"apdb\":\"0x%016" PRIx64 "\",\"apga\":\"0x%016" PRIx64
			 "\",\"ok\":%s,\"mismatch\":%s%s%s}",
			 (int)getpid(), iterations, kept_mask, kept.apia[0], kept.apda[0],
			 kept.apdb[0], kept.apga[0], mismatch ? "false" : "true",
			 mismatch ? "\"" : "", mismatch ? mismatch : "null",
			 mismatch ? "\"" : "");
	if (n < 0)
		return;
	printf("%s\n", line);
	snprintf(tmp, sizeof tmp, "%s.tmp", status_path);
	f = fopen(tmp, "w");
	if (!f) {
		fprintf(stderr, "pacloop: cannot write %s: %s\n", tmp, strerror(errno));
		return;
	}
	fprintf(f, "%s\n", line);
	if (fclose(f) == 0)
		rename(tmp, status_path);
}

static void fail(const char *what, uint64_t was, uint64_t now)
{
	char msg[256];
	snprintf(msg, sizeof msg, "%s changed: was 0x%" PRIx64 ", now 0x%" PRIx64,
		 what, was, now);
	fprintf(stderr, "pacloop: MISMATCH after %" PRIu64 " iterations: %s\n",
		iterations, msg);
	write_status(msg);
	fflush(stdout);
	exit(3);
}

/* The innermost level: compare, touch memory, sleep. */
__attribute__((noinline, noipa)) static uint64_t level3(uint64_t x)
{
	struct sigs now = sign_all();
	long mask = get_mask();
	struct timespec ts = { 0, 1000000 };
	for (unsigned i = 0; i < NMOD; i++) {
		if (now.apia[i] != kept.apia[i])
			fail("the APIA signature (pacia)", kept.apia[i], now.apia[i]);
		if (now.apda[i] != kept.apda[i])
			fail("the APDA signature (pacda)", kept.apda[i], now.apda[i]);
		if (now.apdb[i] != kept.apdb[i])
			fail("the disabled APDB key's result (pacdb)", kept.apdb[i],
			     now.apdb[i]);
		if (now.apga[i] != kept.apga[i])
			fail("the generic signature (pacga)", kept.apga[i], now.apga[i]);
	}
	if (mask != kept_mask)
		fail("the enabled-keys mask (PR_PAC_GET_ENABLED_KEYS)",
		     (uint64_t)kept_mask, (uint64_t)mask);
	buffer[(x * 4096 + x) % sizeof buffer] = (unsigned char)x;
	nanosleep(&ts, NULL);
	return x + 1;
}

/* Non-leaf and not tail calls (they use the result), so each gets a
 * paciasp/autiasp pair. */
__attribute__((noinline, noipa)) static uint64_t level2(uint64_t x)
{
	return level3(x * 3) ^ 2;
}

__attribute__((noinline, noipa)) static uint64_t level1(uint64_t x)
{
	return level2(x + 7) + 1;
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	unsigned long hw = getauxval(AT_HWCAP);
	long r;
	double last;
	if (argc != 2) {
		fprintf(stderr, "usage: pacloop STATUS_FILE\n");
		return 2;
	}
	status_path = argv[1];
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (!(hw & HWCAP_PACA) || !(hw & HWCAP_PACG)) {
		fprintf(stderr,
			"pacloop: this CPU/kernel lacks pointer authentication "
			"(HWCAP_PACA %d, HWCAP_PACG %d; qemu: -cpu max)\n",
			!!(hw & HWCAP_PACA), !!(hw & HWCAP_PACG));
		return 2;
	}
	r = get_mask();
	if (r != (long)ALL_ADDRESS_KEYS) {
		fprintf(stderr, "pacloop: a fresh process has enabled keys %ld, expected %lu\n",
			r, ALL_ADDRESS_KEYS);
		return 2;
	}
	/* Disable APDB: (keys, enabled) = (APDB, 0). */
	if (prctl(PR_PAC_SET_ENABLED_KEYS, PR_PAC_APDBKEY, 0, 0, 0) != 0) {
		fprintf(stderr, "pacloop: PR_PAC_SET_ENABLED_KEYS: %s\n", strerror(errno));
		return 2;
	}
	kept_mask = get_mask();
	if (kept_mask != (long)WANT_MASK) {
		fprintf(stderr, "pacloop: enabled keys read back as %ld, expected %lu\n",
			kept_mask, WANT_MASK);
		return 2;
	}
	kept = sign_all();
	if (!all_plain(kept.apdb)) {
		fprintf(stderr, "pacloop: pacdb changed the pointer with APDB disabled\n");
		return 2;
	}
	if (all_plain(kept.apia) || all_plain(kept.apda)) {
		fprintf(stderr, "pacloop: pacia or pacda left the pointer unsigned under "
				"every modifier: the keys are not in use\n");
		return 2;
	}
	printf("ready pid=%d mask=%ld\n", (int)getpid(), kept_mask);
	write_status(NULL);
	last = now_s();
	for (;;) {
		iterations++;
		if (level1(iterations) == 0)
			buffer[0]++;
		if (now_s() - last >= 0.1) {
			last = now_s();
			write_status(NULL);
		}
	}
}
