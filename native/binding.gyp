{
  # The drbdts native addon: only the system calls Node.js lacks (fallocate, SEEK_DATA/SEEK_HOLE, block device
  # ioctls, the kernel NBD client) plus a batched positioned-I/O worker. Built by `npm run build:native`.
  "targets": [
    {
      "target_name": "drbdts_native",
      "sources": ["src/drbdts_native.cc", "src/dirsync_scan.cc", "src/dirsync_join.cc", "src/dirsync_hash.cc", "src/nbd_data_path.cc", "src/dirsync_copy.cc", "src/repl_plane.cc"],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NAPI_VERSION=8", "NODE_ADDON_API_DISABLE_DEPRECATED", "_FILE_OFFSET_BITS=64", "_GNU_SOURCE"],
      "cflags!": ["-fno-exceptions"],
      "cflags_cc!": ["-fno-exceptions"],
      "cflags_cc": ["-std=c++17", "-O2", "-Wall", "-Wextra"],
      "conditions": [
        ["OS!='linux'", { "sources!": ["src/drbdts_native.cc", "src/dirsync_scan.cc", "src/dirsync_join.cc", "src/dirsync_hash.cc", "src/nbd_data_path.cc", "src/dirsync_copy.cc", "src/repl_plane.cc"] }]
      ]
    }
  ]
}
