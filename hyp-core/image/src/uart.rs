//! The PL011 UART of QEMU's virt machine, transmit only: the launcher reads
//! the image's lines on QEMU's stdio.

use core::fmt;

const UART_DR: *mut u32 = 0x0900_0000 as *mut u32;

/// Writes bytes to the UART data register (QEMU's model never fills its FIFO).
pub struct Uart;

impl fmt::Write for Uart {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            // SAFETY: 0x0900_0000 is the PL011 data register on QEMU virt,
            // device memory with the EL2 MMU off; a volatile 32-bit store
            // transmits one byte.
            unsafe { UART_DR.write_volatile(b as u32) };
        }
        Ok(())
    }
}

/// Prints a line to the UART.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::uart::Uart, $($arg)*);
    }};
}
