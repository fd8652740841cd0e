#![doc = include_str!("../README.md")]

use ruma::{
    OwnedDeviceId, OwnedUserId,
    api::{
        OutgoingRequestExt, SupportedVersions,
        auth_scheme::SendAccessToken,
        client::{
            session::login::{self, v3::LoginInfo},
            uiaa::UserIdentifier,
        },
    },
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("could not build the request: {0}")]
    Build(#[from] ruma::api::error::IntoHttpError),
}

/// A logged-in session. `Debug` never prints the access token.
#[derive(Clone)]
pub struct Session {
    pub homeserver: String,
    pub user_id: OwnedUserId,
    pub device_id: OwnedDeviceId,
    access_token: String,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("homeserver", &self.homeserver)
            .field("user_id", &self.user_id)
            .field("device_id", &self.device_id)
            .field("access_token", &"<redacted>")
            .finish()
    }
}

impl Session {
    /// The session a login response describes.
    pub fn from_login(homeserver: &str, response: login::v3::Response) -> Self {
        Self {
            homeserver: homeserver.trim_end_matches('/').to_owned(),
            user_id: response.user_id,
            device_id: response.device_id,
            access_token: response.access_token,
        }
    }

    pub fn access_token(&self) -> &str {
        &self.access_token
    }
}

fn versions() -> SupportedVersions {
    SupportedVersions::from_parts(&["v1.11".to_owned()], &Default::default())
}

/// An HTTP request for a password login as `user` (a localpart or full user id).
pub fn password_login_request(
    homeserver: &str,
    user: &str,
    password: &str,
    device_name: Option<&str>,
) -> Result<http::Request<Vec<u8>>, ClientError> {
    let identifier =
        UserIdentifier::Matrix(ruma::api::client::uiaa::MatrixUserIdentifier::new(user.to_owned()));
    let mut request = login::v3::Request::new(LoginInfo::Password(login::v3::Password::new(
        identifier,
        password.to_owned(),
    )));
    request.initial_device_display_name = device_name.map(ToOwned::to_owned);
    Ok(request.try_into_http_request(
        homeserver,
        SendAccessToken::None,
        std::borrow::Cow::Owned(versions()),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_request_has_spec_shape() {
        let request = password_login_request("http://127.0.0.1:8008", "alice", "pw", Some("laptop")).unwrap();
        assert_eq!(request.method(), http::Method::POST);
        assert_eq!(request.uri().path(), "/_matrix/client/v3/login");
        let body: serde_json::Value = serde_json::from_slice(request.body()).unwrap();
        assert_eq!(body["type"], "m.login.password");
        assert_eq!(body["identifier"]["type"], "m.id.user");
        assert_eq!(body["identifier"]["user"], "alice");
        assert_eq!(body["initial_device_display_name"], "laptop");
    }

    #[test]
    fn debug_hides_the_token() {
        let response = login::v3::Response::new(
            "@a:localhost".try_into().unwrap(),
            "secret-token".to_owned(),
            "DEV".into(),
        );
        let session = Session::from_login("http://h/", response);
        assert!(!format!("{session:?}").contains("secret-token"));
        assert_eq!(session.access_token(), "secret-token");
    }
}
