// Lets `node --import ./bench/ts-loader.mjs FILE.ts` run a TypeScript benchmark (and the src/ modules it
// imports) without a build step or a new dependency: the TypeScript compiler the project already has strips
// the types, module by module. Node 20 cannot strip types itself. A relative `./x.js` import whose .js file
// does not exist resolves to `./x.ts`, as NodeNext source is written.
import { register } from 'node:module';

register('./ts-loader-hooks.mjs', import.meta.url);
