// Placeholder until this command group lands; replaced by its owner.
export async function run(command: string, _argv: string[]): Promise<number> {
  process.stderr.write(`drbdts: "${command}" is not built yet\n`);
  return 3;
}
