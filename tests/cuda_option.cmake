# The KVFLEET_CUDA setting's spellings (cmake/KvfleetCudaOption.cmake), run
# by ctest as `cuda_option` in script mode:
#   cmake -DKVFLEET_CMAKE_DIR=<repo>/cmake -P cuda_option.cmake
# `off` used to be taken for AUTO, so a build asked to skip CUDA built it
# wherever nvcc was found.
include(${KVFLEET_CMAKE_DIR}/KvfleetCudaOption.cmake)

set(failures 0)
function(expect value want_mode)
  kvfleet_cuda_mode("${value}" mode err)
  if(NOT "${mode}" STREQUAL "${want_mode}")
    message(SEND_ERROR "KVFLEET_CUDA='${value}': got mode '${mode}' (${err}), want '${want_mode}'")
  endif()
  if(want_mode STREQUAL "" AND err STREQUAL "")
    message(SEND_ERROR "KVFLEET_CUDA='${value}': no error message")
  endif()
endfunction()

foreach(v AUTO auto Auto)
  expect(${v} AUTO)
endforeach()
foreach(v ON on On TRUE true YES yes Y 1)
  expect(${v} ON)
endforeach()
foreach(v OFF off Off FALSE false NO no N 0)
  expect(${v} OFF)
endforeach()
foreach(v "" maybe 2 ONN "OFF ")
  expect("${v}" "")
endforeach()
