// Mutual challenge-response authentication with the resource's shared secret (DRBD's cram-hmac-alg +
// shared-secret). Each side sends random bytes and checks the other's HMAC-SHA256 over them; the secret never
// crosses the wire. The HMAC input names the answering role, the resource, the session and the channel, so an
// answer can be neither reflected back to its sender nor replayed on another connection.
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';

export const CHALLENGE_BYTES = 32;

export function newChallenge(): Buffer {
  return randomBytes(CHALLENGE_BYTES);
}

export function authResponse(
  secret: string,
  role: 'acceptor' | 'connector',
  resource: string,
  challenge: Buffer,
  session: Buffer,
  channel: number,
): Buffer {
  const hmac = createHmac('sha256', secret);
  hmac.update(`drbdts-auth-v1\0${role}\0${resource}\0${channel}\0`);
  hmac.update(session);
  hmac.update(challenge);
  return hmac.digest();
}

export function responseMatches(expected: Buffer, received: Buffer): boolean {
  return expected.length === received.length && timingSafeEqual(expected, received);
}
