/* The bodies of execl, execle and execlp. glibc's own build the argument vector and call its
 * internal execve, which no preload library can interpose: a program that put an SDP socket
 * on its stdin and stdout and called execl got no relay, and the new program read nothing.
 * These build the same vector and call execve and execvp by name: in libsdp.so those are the
 * library's hooks, which relay the connections that survive the exec (ops::offload::exec).
 * The exported symbols are naked jumps to these (hooks/process.rs): Rust on stable cannot
 * define a C-variadic function. */
#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <unistd.h>

extern char **environ;

/* The number of arguments after `arg`, up to and excluding the terminating NULL. */
static size_t count(const char *arg, va_list ap) {
    size_t n = 0;
    va_list c;
    va_copy(c, ap);
    for (const char *a = arg; a != NULL; a = va_arg(c, const char *)) n++;
    va_end(c);
    return n;
}

/* Too many arguments for the stack (glibc's limit for the same vector). */
#define MAX_ARGS (1u << 20)

/* Fills argv[0..=n] with `arg` and the n values after it (the last one the terminating NULL). */
static void fill(const char **argv, const char *arg, va_list *ap, size_t n) {
    argv[0] = arg;
    for (size_t i = 1; i <= n; i++) argv[i] = va_arg(*ap, const char *);
}

/* The start of each body: `n`, the arguments after `path`, and the vector on the stack. */
#define ARGV(arg, ap, argv)                                                                      \
    size_t n = count(arg, ap);                                                                   \
    if (n >= MAX_ARGS) {                                                                         \
        va_end(ap);                                                                              \
        errno = E2BIG;                                                                           \
        return -1;                                                                               \
    }                                                                                            \
    const char *argv[n + 1];                                                                     \
    fill(argv, arg, &ap, n)

int sdp_execl(const char *path, const char *arg, ...) {
    va_list ap;
    va_start(ap, arg);
    ARGV(arg, ap, argv);
    va_end(ap);
    return execve(path, (char *const *)argv, environ);
}

int sdp_execle(const char *path, const char *arg, ...) {
    va_list ap;
    va_start(ap, arg);
    ARGV(arg, ap, argv);
    char *const *envp = va_arg(ap, char *const *);
    va_end(ap);
    return execve(path, (char *const *)argv, envp);
}

int sdp_execlp(const char *file, const char *arg, ...) {
    va_list ap;
    va_start(ap, arg);
    ARGV(arg, ap, argv);
    va_end(ap);
    return execvp(file, (char *const *)argv);
}
