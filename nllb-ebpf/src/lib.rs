#![no_std]
// The programs live in the `nllb` binary target; this empty library lets
// nllb-userspace name the crate as a build-dependency so cargo rebuilds the
// embedded object when it changes.
