//! Empty: this file exists so cargo sees a library target (aya-template).
#![no_std]
