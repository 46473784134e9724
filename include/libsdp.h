/*
 * libsdp.h — socket families for programs that ask libsdp for offload explicitly.
 *
 * Under LD_PRELOAD=libsdp.so, socket(AF_INET_OFFLOAD, SOCK_STREAM, 0) creates an IPv4 stream
 * socket that libsdp offloads to SDP where it can, falling back to TCP as the policy allows
 * (a `tcp` rule is raised to `both`). socket(AF_INET_DIRECT, SOCK_STREAM, 0) asks for SDP
 * without TCP fallback. Addresses are plain struct sockaddr_in (sin_family AF_INET).
 *
 * Without libsdp loaded the kernel rejects both families with EAFNOSUPPORT, so a program can
 * try AF_INET_OFFLOAD first and fall back to AF_INET itself.
 *
 * AF_INET_OFFLOAD has the number the original libsdp gave AF_INET_SDP, so programs written for
 * it keep working.
 */
#ifndef LIBSDP_H
#define LIBSDP_H

#define AF_INET_OFFLOAD 27
#define AF_INET_DIRECT 28

#define PF_INET_OFFLOAD AF_INET_OFFLOAD
#define PF_INET_DIRECT AF_INET_DIRECT

#endif /* LIBSDP_H */
