# Warning flags for kvfleet's own targets. Third-party headers are included as
# SYSTEM so that -Werror applies to our code only.
function(kvfleet_set_warnings target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic -Wshadow -Wnon-virtual-dtor
      -Wold-style-cast -Wcast-align -Wunused -Woverloaded-virtual -Wconversion
      -Wsign-conversion -Wnull-dereference -Wdouble-promotion -Wformat=2
      -Wimplicit-fallthrough>)
  if(KVFLEET_WERROR)
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-Werror>)
  endif()
endfunction()
