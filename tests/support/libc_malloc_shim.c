/* Routes malloc and friends to glibc's allocator, for a redis-server run under libfaketime.

Debian's redis-server uses jemalloc, which calls clock_gettime() while libfaketime is still
initialising, and libfaketime cannot recover from that (libfaketime issues #130, #327). Preloaded
before libfaketime, this makes every allocation glibc's, so jemalloc never runs. Built by the
clock-jump test with `cc -shared -fPIC -nostdlib` (no headers or libc development files needed);
the symbols resolve against the server's own libc at load time. */

typedef unsigned long size_t;
extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void __libc_free(void *);
extern void *__libc_memalign(size_t, size_t);
extern void *dlopen(const char *, int);
extern void *dlsym(void *, const char *);

void *malloc(size_t n) { return __libc_malloc(n); }
void *calloc(size_t count, size_t n) { return __libc_calloc(count, n); }
void *realloc(void *p, size_t n) { return __libc_realloc(p, n); }
void free(void *p) { __libc_free(p); }
void *memalign(size_t align, size_t n) { return __libc_memalign(align, n); }
void *aligned_alloc(size_t align, size_t n) { return __libc_memalign(align, n); }
int posix_memalign(void **out, size_t align, size_t n) {
  void *p = __libc_memalign(align, n);
  if (!p) return 12; /* ENOMEM */
  *out = p;
  return 0;
}

/* Redis sizes its allocations with malloc_usable_size(): glibc's, found in libc itself. */
static size_t (*libc_usable_size)(void *);
size_t malloc_usable_size(void *p) {
  if (!libc_usable_size) {
    void *libc = dlopen("libc.so.6", 2 | 4); /* RTLD_NOW | RTLD_NOLOAD */
    libc_usable_size = (size_t (*)(void *))dlsym(libc, "malloc_usable_size");
  }
  return p ? libc_usable_size(p) : 0;
}

/* jemalloc's own entry points that Redis may call. */
void *mallocx(size_t n, int flags) { (void)flags; return __libc_malloc(n); }
void *rallocx(void *p, size_t n, int flags) { (void)flags; return __libc_realloc(p, n); }
void dallocx(void *p, int flags) { (void)flags; __libc_free(p); }
void sdallocx(void *p, size_t n, int flags) { (void)n; (void)flags; __libc_free(p); }
size_t nallocx(size_t n, int flags) { (void)flags; return n; }
