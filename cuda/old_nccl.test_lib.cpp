// A stand-in for an NCCL older than kvfleet needs (2.13.4): only its
// version is asked for, so that is all it defines. Loaded by
// nccl_library.test.cpp.

extern "C" int ncclGetVersion(int* version) {
  *version = 21304;
  return 0;
}
