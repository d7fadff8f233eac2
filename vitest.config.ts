import { defineConfig } from 'vitest/config';

// Test files that start replicated `drbdts up` daemons (they inherit this process's environment). They run twice,
// once per replication data path (DRBDTS_REPL_DATA_PATH), as the projects `repl-native` and `repl-js`; vitest
// prints the project in front of each file. test/replication-native-plane.test.ts sets the path per daemon itself
// and runs once. test/kernel-filesystem.test.ts also starts a pair, but only inside the kernel VM, and runs once.
const bothDataPaths = [
  'test/cli-queries.test.ts',
  'test/fuzz-peer.test.ts',
  'test/replication-campaign.test.ts',
  'test/replication-disk-full.test.ts',
  'test/replication-dual-primary.test.ts',
  'test/replication-failover.test.ts',
  'test/replication-faults.test.ts',
  'test/replication-ordering.test.ts',
  'test/replication-resync.test.ts',
  'test/resource-adjust.test.ts',
  'test/resource-cli.test.ts',
  'test/resource-diskless.test.ts',
  'test/resource-outdate.test.ts',
  'test/resource-ops.test.ts',
  'test/resource-splitbrain.test.ts',
];

// Tests start real processes (nbdkit, qemu-io, fio, drbdts daemons): give them time, and run files one at a
// time on this 2-core machine so timing-sensitive tests (keepalive timeouts) do not starve each other
// (fileParallelism false: one worker for all projects together).
export default defineConfig({
  test: {
    testTimeout: 120_000,
    hookTimeout: 120_000,
    fileParallelism: false,
    reporters: ['default'],
    projects: [
      { extends: true, test: { name: 'main', include: ['test/**/*.test.ts'], exclude: bothDataPaths } },
      { extends: true, test: { name: 'repl-native', include: bothDataPaths, env: { DRBDTS_REPL_DATA_PATH: 'native' } } },
      { extends: true, test: { name: 'repl-js', include: bothDataPaths, env: { DRBDTS_REPL_DATA_PATH: 'js' } } },
    ],
  },
});
