// The disk of a Diskless node (DRBD's on-io-error detach, `drbdts detach`): reads are asked of the peer, whose
// disk answers them after every write sent before the request (both travel on the data socket, in order);
// writes, trims and zeroes are done by the peer alone (ReplicatedDevice ships them as always, and completes
// them on the peer's ack), so here they do nothing. Without a connection there is no disk at all: EIO.
import { BlockDeviceError, type BlockDevice, type BlockDeviceCapabilities, type Extent, type ZeroOptions } from '../blockdev/types.js';
import { CHANNEL_DATA, type PeerChannel } from './link.js';
import { FrameFlag, FrameType } from './frame.js';

interface PendingRead {
  target: Buffer;
  resolve: () => void;
  reject: (error: Error) => void;
}

export class PeerDisk implements BlockDevice {
  private readonly reads = new Map<number, PendingRead>();
  private nextId = 1;
  private connection: PeerChannel | null = null;

  constructor(
    readonly sizeBytes: number,
    private readonly caps: BlockDeviceCapabilities,
    private readonly why: string,
  ) {}

  /** The connection reads go over (null: none; pending reads fail). */
  setConnection(connection: PeerChannel | null): void {
    if (connection === this.connection) return;
    this.connection = connection;
    if (connection === null) this.failAll('the connection to the peer, which holds the only disk, is gone');
  }

  capabilities(): BlockDeviceCapabilities {
    return this.caps;
  }

  read(offset: number, target: Buffer): Promise<void> {
    const connection = this.connection;
    if (connection === null || connection.closedReason !== null) {
      return Promise.reject(new BlockDeviceError('EIO', `Diskless (${this.why}) and not connected to the peer: no disk to read from`));
    }
    const id = this.nextId;
    this.nextId = (this.nextId + 1) & 0x7fffffff || 1;
    const length = Buffer.alloc(4);
    length.writeUInt32BE(target.length);
    return new Promise<void>((resolve, reject) => {
      this.reads.set(id, { target, resolve, reject });
      connection.send(CHANNEL_DATA, FrameType.READ_REQUEST, 0, id, offset, length);
    });
  }

  /** READ_REPLY from the peer. */
  handleReply(flags: number, id: number, body: Buffer): void {
    const read = this.reads.get(id);
    if (read === undefined) return;
    this.reads.delete(id);
    if ((flags & FrameFlag.ERROR) !== 0) {
      const errno = body.length >= 4 ? body.readUInt32BE(0) : 5;
      read.reject(new BlockDeviceError('EIO', `the peer's disk failed the read (errno ${errno})`));
      return;
    }
    if (body.length !== read.target.length) {
      read.reject(new BlockDeviceError('EIO', `the peer answered ${body.length} bytes for a read of ${read.target.length}`));
      return;
    }
    body.copy(read.target);
    read.resolve();
  }

  private failAll(why: string): void {
    const reads = [...this.reads.values()];
    this.reads.clear();
    for (const read of reads) read.reject(new BlockDeviceError('EIO', `Diskless: ${why}`));
  }

  // The peer writes; this node has nothing to write to.
  async write(): Promise<void> {}
  async flush(): Promise<void> {}
  async trim(): Promise<void> {}
  async zero(_offset: number, _lengthBytes: number, _options: ZeroOptions): Promise<void> {}
  async cache(): Promise<void> {}
  async blockStatus(offset: number, lengthBytes: number): Promise<Extent[]> {
    return [{ lengthBytes, flags: 0 }];
  }

  async close(): Promise<void> {
    this.failAll('the device closed');
  }
}
