# kvfleet_cuda_mode(VALUE OUT_MODE OUT_ERROR): the KVFLEET_CUDA setting as
# AUTO, ON or OFF. Case does not matter, and CMake's other boolean spellings
# (TRUE/FALSE, YES/NO, Y/N, 1/0) mean ON and OFF, so `-DKVFLEET_CUDA=off`
# skips CUDA as `OFF` does. Anything else leaves OUT_MODE empty and puts
# the reason in OUT_ERROR. Kept apart from KvfleetCuda.cmake so that
# tests/cuda_option.cmake can run it in script mode.
function(kvfleet_cuda_mode value out_mode out_error)
  string(TOUPPER "${value}" upper)
  set(mode "")
  set(err "")
  if(upper STREQUAL "AUTO")
    set(mode AUTO)
  elseif(upper MATCHES "^(ON|TRUE|YES|Y|1)$")
    set(mode ON)
  elseif(upper MATCHES "^(OFF|FALSE|NO|N|0)$")
    set(mode OFF)
  else()
    set(err "KVFLEET_CUDA must be AUTO, ON or OFF, got '${value}'")
  endif()
  set(${out_mode} "${mode}" PARENT_SCOPE)
  set(${out_error} "${err}" PARENT_SCOPE)
endfunction()
