//! The client side of the inhibitor protocol (`otter-agent inhibit`).

use std::path::Path;

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::UnixStream;

use super::*;

/// The client side of the protocol, one connection.
pub struct InhibitClient {
    stream: BufReader<UnixStream>,
}

impl InhibitClient {
    pub async fn connect(path: &Path) -> Result<InhibitClient, InhibitError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| InhibitError::Socket {
                path: path.to_owned(),
                source,
            })?;
        Ok(InhibitClient {
            stream: BufReader::new(stream),
        })
    }

    /// Sends `request` and reads its answer; an `error` answer is
    /// [`InhibitError::Refused`].
    pub async fn request(&mut self, request: &Request) -> Result<Response, InhibitError> {
        let io = InhibitError::Connection;
        let mut text =
            serde_json::to_vec(request).map_err(|e| InhibitError::BadAnswer(e.to_string()))?;
        text.push(b'\n');
        self.stream.get_mut().write_all(&text).await.map_err(io)?;
        let mut line = Vec::new();
        let read = (&mut self.stream)
            .take(MAX_LINE_BYTES as u64 * 64)
            .read_until(b'\n', &mut line)
            .await
            .map_err(io)?;
        if read == 0 {
            return Err(InhibitError::Closed);
        }
        let response: Response =
            serde_json::from_slice(&line).map_err(|e| InhibitError::BadAnswer(e.to_string()))?;
        match response.error {
            Some(error) => Err(InhibitError::Refused(error)),
            None if response.ok == Some(true) => Ok(response),
            None => Err(InhibitError::BadAnswer(
                String::from_utf8_lossy(&line).into_owned(),
            )),
        }
    }

    pub async fn take(
        &mut self,
        name: &str,
        reason: &str,
        ttl: Duration,
    ) -> Result<(), InhibitError> {
        self.request(&Request::Take(TakeRequest {
            name: name.to_owned(),
            reason: reason.to_owned(),
            ttl_seconds: ttl.as_secs(),
        }))
        .await
        .map(|_| ())
    }

    pub async fn release(&mut self, name: &str) -> Result<(), InhibitError> {
        self.request(&Request::Release(ReleaseRequest {
            name: name.to_owned(),
        }))
        .await
        .map(|_| ())
    }

    pub async fn list(&mut self) -> Result<Vec<InhibitorInfo>, InhibitError> {
        let response = self.request(&Request::List(ListRequest {})).await?;
        Ok(response.inhibitors.unwrap_or_default())
    }

    /// Completes when the agent closes the connection (it stopped).
    pub async fn closed(&mut self) {
        let mut buffer = [0u8; 256];
        loop {
            match self.stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    }
}
