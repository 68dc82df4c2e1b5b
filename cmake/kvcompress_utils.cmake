# Helpers for CMakeLists.txt: locating torch's CMake package, deciding whether to
# build CUDA, and turning TORCH_CUDA_ARCH_LIST into nvcc gencode flags.

function(kvcompress_find_torch_prefix python out)
  execute_process(
    COMMAND ${python} -c "import torch.utils; print(torch.utils.cmake_prefix_path)"
    OUTPUT_VARIABLE prefix OUTPUT_STRIP_TRAILING_WHITESPACE
    RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "kvcompress: torch must be importable by ${python} to build the extension")
  endif()
  set(${out} ${prefix} PARENT_SCOPE)
endfunction()

# AUTO builds CUDA when nvcc is found through CUDACXX or CUDA_HOME.
function(kvcompress_want_cuda out)
  if(KVCOMPRESS_CUDA STREQUAL "AUTO")
    if(NOT DEFINED ENV{CUDACXX} AND DEFINED ENV{CUDA_HOME} AND EXISTS "$ENV{CUDA_HOME}/bin/nvcc")
      set(ENV{CUDACXX} "$ENV{CUDA_HOME}/bin/nvcc")
    endif()
    if(DEFINED ENV{CUDACXX} AND EXISTS "$ENV{CUDACXX}")
      set(${out} ON PARENT_SCOPE)
    else()
      message(STATUS "kvcompress: no CUDA toolkit (set CUDA_HOME); building CPU kernels only")
      set(${out} OFF PARENT_SCOPE)
    endif()
  elseif(KVCOMPRESS_CUDA)
    if(DEFINED ENV{CUDA_HOME} AND NOT DEFINED ENV{CUDACXX})
      set(ENV{CUDACXX} "$ENV{CUDA_HOME}/bin/nvcc")
    endif()
    set(${out} ON PARENT_SCOPE)
  else()
    set(${out} OFF PARENT_SCOPE)
  endif()
endfunction()

set(KVCOMPRESS_DEFAULT_ARCHS "8.0 8.9 9.0 10.0+PTX")

# TORCH_CUDA_ARCH_LIST entries look like "9.0", "9.0a" or "10.0+PTX", separated by
# spaces or semicolons. The default covers Ampere, Ada, Hopper and Blackwell.
function(kvcompress_cuda_arch_flags out)
  set(archs "$ENV{TORCH_CUDA_ARCH_LIST}")
  if(archs STREQUAL "")
    set(archs "${KVCOMPRESS_DEFAULT_ARCHS}")
  endif()
  string(REPLACE " " ";" archs "${archs}")
  set(flags "")
  foreach(arch IN LISTS archs)
    if(arch STREQUAL "")
      continue()
    endif()
    string(REGEX MATCH "^([0-9]+)\\.([0-9]+)([af]?)(\\+PTX)?$" ok "${arch}")
    if(NOT ok)
      message(FATAL_ERROR "kvcompress: cannot read '${arch}' in TORCH_CUDA_ARCH_LIST")
    endif()
    set(sm "${CMAKE_MATCH_1}${CMAKE_MATCH_2}${CMAKE_MATCH_3}")
    list(APPEND flags "-gencode=arch=compute_${sm},code=sm_${sm}")
    if(CMAKE_MATCH_4)
      list(APPEND flags "-gencode=arch=compute_${sm},code=compute_${sm}")
    endif()
  endforeach()
  set(${out} ${flags} PARENT_SCOPE)
endfunction()

# torch's CMake package (a CUDA build) looks for the toolkit with FindCUDA and for
# NVRTC, which a pip-installed toolkit may lack; torch's own wheels carry NVRTC.
# It also probes GPUs for an arch list unless TORCH_CUDA_ARCH_LIST is set.
function(kvcompress_prepare_torch_cuda python)
  if("$ENV{TORCH_CUDA_ARCH_LIST}" STREQUAL "")
    set(ENV{TORCH_CUDA_ARCH_LIST} "${KVCOMPRESS_DEFAULT_ARCHS}")
  endif()
  if(DEFINED ENV{CUDA_HOME})
    set(CUDA_TOOLKIT_ROOT_DIR "$ENV{CUDA_HOME}" CACHE PATH "CUDA toolkit")
  endif()
  execute_process(
    COMMAND ${python} -c "import os, nvidia; print(';'.join(os.path.join(p, d, 'lib') for p in nvidia.__path__ for d in os.listdir(p)))"
    OUTPUT_VARIABLE wheel_libs OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  find_library(CUDA_nvrtc_LIBRARY NAMES nvrtc libnvrtc.so.13 libnvrtc.so.12
    HINTS "$ENV{CUDA_HOME}/lib64" "$ENV{CUDA_HOME}/lib" ${wheel_libs})
endfunction()

# torch's CMake package appends gencode flags for TORCH_CUDA_ARCH_LIST (or for
# whatever it detects) to CMAKE_CUDA_FLAGS; ours come from kvcompress_cuda_arch_flags.
macro(kvcompress_drop_torch_gencode_flags)
  string(REGEX REPLACE "-gencode[ =]arch=compute_[0-9a-z]+,code=[a-z]+_[0-9a-z]+" ""
         CMAKE_CUDA_FLAGS "${CMAKE_CUDA_FLAGS}")
endmacro()
