// Package image is the image store: OCI images pulled from registries (or read from OCI image
// layouts on disk), every blob verified against its digest, each layer unpacked once and shared
// read-only by every cell whose root stacks it.
//
// On disk, under the store's directory (the library's ownership rule applies to it):
//
//	lock                 flock: shared by pulls and uses, exclusive by GC
//	blobs/sha256/HEX     manifests and configs, by digest (re-verified whenever read)
//	layers/HEX/fs        a layer unpacked in overlayfs's format, HEX its diff id (the sha256 of
//	                     the uncompressed tar, verified against the image's config)
//	layers/HEX/size      its unpacked bytes
//	refs/HEX             a name: {"ref", "digest", "pulled"}, HEX the sha256 of the name
//	tmp/                 work in progress; what is here is never used
//
// A compressed layer is downloaded into tmp/, verified, unpacked into tmp/ (its uncompressed
// digest verified as it is read) and only then renamed into layers/ — a layer there is complete.
// The compressed blob is not kept: the unpacked layer is the one copy. A failed pull leaves
// nothing in tmp/ and nothing new in layers/ except layers it completed and verified in full.
package image
