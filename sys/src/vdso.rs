//! The vDSO and vvar areas of a process and the vDSO's symbols (ELF parsed
//! with `object`). (Being written.)
