// Command dispatch for `drbdts`. Each command group lives in its own module exporting
// `run(command, argv): Promise<number>` (the exit code), loaded only when used so that
// `drbdts --help` stays fast and one group's dependencies never slow another's start.

type CommandModule = { run(command: string, argv: string[]): Promise<number> };

interface CommandGroup {
  commands: string[];
  load(): Promise<CommandModule>;
  summary: string;
}

const groups: CommandGroup[] = [
  {
    commands: ['serve'],
    load: () => import('./serve.js'),
    summary: 'serve DISK --listen unix:PATH|HOST:PORT   serve a local disk over NBD (standalone)',
  },
  {
    commands: [
      'create-md', 'up', 'down', 'primary', 'secondary', 'connect', 'disconnect', 'outdate', 'adjust', 'detach', 'attach', 'invalidate',
      'invalidate-remote', 'new-current-uuid', 'status', 'resync', 'verify', 'pause-sync', 'resume-sync', 'events2',
      'role', 'cstate', 'dstate', 'dump-md', 'dump', 'get-gi', 'wait-connect', 'wait-sync',
    ],
    load: () => import('./resource.js'),
    summary: 'COMMAND RES [--config FILE] [--node NAME]  replicated resource commands (DRBD vocabulary)',
  },
  {
    commands: ['dirsync', 'dirsync-server'],
    load: () => import('../dirsync/cli.js'),
    summary: 'dirsync ROOT1 ROOT2 [options]             bidirectional directory sync (unison-style)',
  },
];

export const usage = `Usage: drbdts COMMAND [ARGS...]

A userspace replicated block device with DRBD's semantics, served over NBD,
and a bidirectional directory sync engine.

Standalone NBD serving:
  serve DISK --listen unix:PATH|HOST:PORT [--export NAME] [--size SIZE] [--read-only]
        [--tls-cert FILE --tls-key FILE] [--device /dev/nbdN]

Replicated resources (config: /etc/drbdts/RES.toml, node: $DRBDTS_NODE or the host name):
  create-md RES [--force]           write fresh metadata (creates a missing backing file)
  up RES                            run the node daemon in the foreground (SIGTERM = down)
  down RES [--force]                stop a running node (refused while NBD clients hold the export)
  primary RES [--force]             promote (--force: make this node's data the good copy)
  secondary RES                     demote
  connect RES [--discard-my-data]   (re)connect to the peer
  disconnect RES                    drop the peer connection, stay StandAlone
  adjust RES [--json]               apply the config file's changes to the running node (exit 1: needs down/up)
  detach RES [--force]              Diskless: leave the local disk, serve reads and writes from the peer's
  attach RES                        take the local disk back (Secondary); the peer resyncs what changed
  outdate RES                       mark this node's data possibly stale (refused on a Primary, while connected)
  invalidate RES                    discard local data, full resync from the peer
  invalidate-remote RES             full resync to the peer
  new-current-uuid RES [--clear-bitmap]
  verify RES                        online verify against the peer
  status RES [--json] [--statistics]  state, peer state, out-of-sync bytes, counters, last connection error
  resync RES [status|pause|resume] [--rate R] [--wait [--timeout S]] [--json]
  pause-sync RES, resume-sync RES   pause / resume the resync
  wait-connect RES [--timeout S]    wait until connected to the peer
  wait-sync RES [--timeout S]       wait until connected and every resync has ended
  role RES, cstate RES, dstate RES  one-word state queries for scripts (--json: an object)
  events2 RES [--now] [--full] [--statistics]  drbdsetup-style event lines
  dump-md RES [--json]              the on-disk metadata of a stopped node
  dump RES [--json]                 the configuration as read, defaults filled in (drbdadm dump)
  get-gi RES [--json]               the generation UUIDs CURRENT:BITMAP:HISTORY1:HISTORY2
  Common options: --config FILE, --node NAME

Directory sync:
  dirsync ROOT1 ROOT2 [--batch] [--prefer ROOT1|ROOT2|newer|older] [--copy-on-conflict]
          [--ignore PATTERN]... [--times] [--perms] [--always-hash] [--watch]
          [--archive-dir DIR] [--json] [--dry-run]
  dirsync-server --listen ADDR --root DIR | --stdio

Run 'drbdts COMMAND --help' for a command's options.
Exit codes: 0 done, 1 refused or failed, 2 bad usage, 5 a wait timed out (docs/operators.md).
`;

export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (command === undefined || command === '--help' || command === '-h' || command === 'help') {
    // No command at all is a usage error (exit 2, usage on stderr); asking for help is not.
    if (command === undefined) {
      process.stderr.write(usage);
      return 2;
    }
    process.stdout.write(usage);
    return 0;
  }
  if (command === '--version' || command === '-V') {
    const { createRequire } = await import('node:module');
    const pkg = createRequire(import.meta.url)('../../package.json') as { version: string };
    process.stdout.write(`drbdts ${pkg.version}\n`);
    return 0;
  }
  const group = groups.find((candidate) => candidate.commands.includes(command));
  if (group === undefined) {
    process.stderr.write(`drbdts: unknown command "${command}" (drbdts --help lists them)\n`);
    return 2;
  }
  const module = await group.load();
  return module.run(command, rest);
}
