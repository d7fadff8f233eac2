import { defineConfig } from 'vitest/config';

// Tests start real processes (nbdkit, qemu-io, fio, drbdts daemons): give them time, and run files one at a
// time on this 2-core machine so timing-sensitive tests (keepalive timeouts) do not starve each other.
export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    fileParallelism: false,
    reporters: ['default'],
  },
});
